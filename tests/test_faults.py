"""Fault injection: kills, failed writes and bad configs lose nothing and name the problem.

Each test injects one kind of fault; `FAULTS` at the bottom counts them for the report.
"""

from __future__ import annotations

import csv
import errno
import os
import random
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from diffusion.jobs.errors import exit_on_user_error
from diffusion.training import checkpoint_io
from diffusion.training.checkpoint_io import AtomicCheckpointIO, NonFiniteModelError
from diffusion.training.run import train
from diffusion.utils import atomic
from diffusion.utils.atomic import atomic_savez

from conftest import REPO
from test_train import TINY_RUN

pytestmark = pytest.mark.slow

# A run of a tiny UNet: 24 steps, a checkpoint every 4, a loss row every step.
RUN = [*TINY_RUN, "trainer.max_steps=24", "callbacks.model_checkpoint.every_n_train_steps=4",
       "trainer.val_check_interval=1000", "trainer.limit_val_batches=0", "test_after_fit=false",
       "~callbacks.sample_grid", "module.schedule_sampler=loss-second-moment", "model.dropout=0.1",
       "+trainer.enable_progress_bar=false"]


def start(out, *extra):
    cmd = [sys.executable, "train.py", *RUN, f"hydra.run.dir={out}", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}  # for fixtures.InjectNaN
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def inject_nan(*steps):
    return ["+callbacks.nan._target_=fixtures.InjectNaN", f"+callbacks.nan.steps=[{','.join(map(str, steps))}]"]


def losses(out):
    rows = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert len(steps) == len(set(steps)), "duplicate metric rows"
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def wait_for(path, process, timeout=240):
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    process = start(out)
    assert process.wait(timeout=600) == 0, process.stderr.read()[-3000:]
    return out


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return losses(uninterrupted_run)


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_a_random_moment_then_resume_is_exact(uninterrupted, tmp_path, seed):
    out = tmp_path / "run"
    process = start(out)
    wait_for(out / "checkpoints" / "last.ckpt", process)
    time.sleep(random.Random(seed).uniform(0.0, 3.0))  # somewhere after the first checkpoint
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    resumed = start(out, "ckpt_path=last")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    assert losses(out) == uninterrupted, f"killed after step {killed_at}"


def test_every_checkpoint_reaches_disk_after_the_rows_of_its_steps(compose_cfg, tmp_path, monkeypatch):
    """Lightning saves a step's checkpoint before logging that step; a kill in between once lost
    a row for good (the resumed run starts after it). Each write must find the rows of all the
    steps it covers in metrics.csv (the deterministic form of the SIGKILL test above)."""
    out = tmp_path / "run"
    seen = []
    real_save = checkpoint_io.save_checkpoint

    def save_and_look(checkpoint, path):
        steps = set(losses(out)) if (out / "csv" / "metrics.csv").exists() else set()
        seen.append((checkpoint["global_step"], steps))
        real_save(checkpoint, path)

    monkeypatch.setattr(checkpoint_io, "save_checkpoint", save_and_look)
    overrides = [o for o in RUN if not o.startswith(("+trainer.enable_progress_bar", "trainer.max_steps"))]
    train(compose_cfg("train", [*overrides, "trainer.max_steps=8"], output_dir=out))
    assert [step for step, _ in seen] == [4, 4, 8, 8]  # step{step}.ckpt and last.ckpt, every 4 steps
    for step, logged in seen:
        assert set(range(step)) <= logged, f"checkpoint of step {step} written before rows {set(range(step)) - logged}"


def test_a_held_checkpoint_is_a_copy_written_in_order_on_release(tmp_path):
    io = AtomicCheckpointIO()
    weights = torch.ones(3)
    (tmp_path / "old.ckpt").write_bytes(b"old")
    io.hold()
    io.save_checkpoint({"state_dict": {"w": weights}, "global_step": 4}, tmp_path / "new.ckpt")
    io.remove_checkpoint(tmp_path / "old.ckpt")
    weights.mul_(0)  # the EMA swap for validation, or the next optimizer step
    assert sorted(os.listdir(tmp_path)) == ["old.ckpt"]  # nothing written or removed yet
    io.release()
    assert sorted(os.listdir(tmp_path)) == ["new.ckpt"]
    assert torch.equal(torch.load(tmp_path / "new.ckpt")["state_dict"]["w"], torch.ones(3))
    io.save_checkpoint({"state_dict": {"w": weights}, "global_step": 5}, tmp_path / "now.ckpt")
    assert (tmp_path / "now.ckpt").is_file()  # released: written at once


def test_held_checkpoints_share_the_copy_of_a_tensor_and_only_of_the_same_tensor(tmp_path):
    io, weights = AtomicCheckpointIO(), torch.ones(1000)
    io.hold()
    steps = range(50)
    for step in steps:  # a fresh tensor per save, freed after it: its address comes back
        io.save_checkpoint({"state_dict": {"w": weights}, "step_tensor": torch.full((3,), float(step))},
                           tmp_path / f"{step}.ckpt")
    assert len(io._copies) == 1 + len(steps)  # the weights once, each fresh tensor on its own
    io.release()
    for step in steps:
        checkpoint = torch.load(tmp_path / f"{step}.ckpt")
        assert torch.equal(checkpoint["step_tensor"], torch.full((3,), float(step)))
        assert torch.equal(checkpoint["state_dict"]["w"], torch.ones(1000))
    assert io._copies == {}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_run_saves_exits_nonzero_and_prints_the_command_that_resumes_it(uninterrupted, tmp_path, signum):
    """SIGTERM (pre-emption) and Ctrl-C save last.ckpt at the end of the step in progress,
    exit with 128 + the signal number (a scheduler must not record a finished job), and print
    the command that resumes; that very command finishes the run exactly."""
    out = tmp_path / "run"
    last = out / "checkpoints" / "last.ckpt"
    process = start(out)
    wait_for(last, process)
    process.send_signal(signum)
    assert process.wait(timeout=120) == 128 + signum
    stderr = process.stderr.read()
    saved = torch.load(last, weights_only=False)["global_step"]
    assert saved >= 4 and f"stopped by {signum.name} at step {saved} of 24; saved {last}" in stderr, stderr[-2000:]
    argv = shlex.split(stderr.strip().splitlines()[-1].removeprefix("resume with: "))
    assert argv[:2] == ["python", "train.py"] and argv[-2:] == [f"hydra.run.dir={out}", "ckpt_path=last"]
    resumed = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(out) == uninterrupted


def test_a_write_that_fails_half_way_leaves_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "samples.npz"
    atomic_savez(str(target), arr_0=np.zeros(4, np.uint8))
    before = target.read_bytes()

    real_fdopen = os.fdopen

    class DiskFull:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            if self.written > 16:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    ckpt = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, ckpt)
    saved = ckpt.read_bytes()

    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: DiskFull(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space"):
        atomic_savez(str(target), arr_0=np.ones(10_000, np.uint8))
    with pytest.raises(OSError, match="previous file is intact"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(10_000)}}, ckpt)
    assert target.read_bytes() == before and ckpt.read_bytes() == saved
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt", "samples.npz"]  # no temporary file left


def test_a_nonfinite_model_never_replaces_a_good_checkpoint(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, ckpt)
    saved = ckpt.read_bytes()
    bad = {"state_dict": {"w": torch.tensor([1.0, float("nan"), 2.0])}, "global_step": 2}
    with pytest.raises(NonFiniteModelError, match="step 2.*w.*previous .* is intact"):
        AtomicCheckpointIO().save_checkpoint(bad, ckpt)
    assert ckpt.read_bytes() == saved


def test_nan_batches_are_skipped_counted_and_the_run_finishes(tmp_path):
    out = tmp_path / "run"
    process = start(out, *inject_nan(5, 13))
    assert process.wait(timeout=600) == 0
    stderr = process.stderr.read()
    assert "latest at step 5 (batch timesteps t = [" in stderr and "latest at step 13" in stderr
    rows = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    skipped = {int(r["step"]): float(r["train/skipped_steps"]) for r in rows if r.get("train/skipped_steps")}
    assert skipped[max(skipped)] == 2 and skipped[4] == 0
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 24 and all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_a_nan_batch_under_the_stop_policy_names_it_keeps_the_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "run"
    process = start(out, *inject_nan(9), "module.nonfinite.policy=stop")
    assert process.wait(timeout=600) == 1
    stderr = process.stderr.read()
    last = out / "checkpoints" / "last.ckpt"
    assert "error: non-finite loss or gradient at step 9, batch timesteps t = [" in stderr, stderr[-2000:]
    assert f"the last good checkpoint is {last}" in stderr
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == 8 and all(torch.isfinite(v).all() for v in state["state_dict"].values())
    resumed = start(out, "ckpt_path=last")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    assert torch.load(last, weights_only=False)["global_step"] == 24


@pytest.fixture
def small_disk():
    """``small_disk(folder, size)`` mounts a tmpfs of ``size`` bytes at ``folder`` (root in a
    container can; elsewhere the test is skipped); unmounted afterwards."""
    mounted = []

    def mount(folder, size):
        folder.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip()}); needs root")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", str(folder)], check=True)


def train_until_error(compose_cfg, out, capsys, *extra):
    """train(cfg) behind train.py's error path: (exit status, the last line of stderr)."""
    cfg = compose_cfg("train", [*RUN, *extra], output_dir=out)
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        train(cfg)
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    return exit_info.value.code, stderr.strip().splitlines()[-1]


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous_checkpoint(
        compose_cfg, uninterrupted_run, small_disk, tmp_path, capsys):
    size = (uninterrupted_run / "checkpoints" / "last.ckpt").stat().st_size
    out = tmp_path / "run"
    folder = small_disk(out / "checkpoints", int(2.5 * size))  # room for step 4 and last.ckpt, not step 8
    status, line = train_until_error(compose_cfg, out, capsys, "trainer.max_steps=12")
    assert status == 2 and line.startswith(f"error: writing checkpoint {folder / 'step0000008.ckpt'} failed")
    assert "No space left on device" in line and "hydra.run.dir" in line
    assert sorted(os.listdir(folder)) == ["last.ckpt", "step0000004.ckpt"]  # no temporary file left
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 4


def test_a_full_disk_for_the_metrics_is_one_line_naming_the_file(compose_cfg, small_disk, tmp_path, capsys):
    out = tmp_path / "run"
    page = os.sysconf("SC_PAGE_SIZE")
    folder = small_disk(out / "csv", 16 * page)
    (folder / "fill").write_bytes(bytes(15 * page))  # one page left: hparams.yaml takes it
    status, line = train_until_error(compose_cfg, out, capsys, "trainer.max_steps=4")
    assert status == 2 and line.startswith(f"error: No space left on device: {folder / 'metrics.csv'}")
    assert sorted(os.listdir(folder)) == ["fill", "hparams.yaml"]  # nothing half-written


INVALID = {
    "model.model_channels=48": "48",                        # not divisible by 32 GroupNorm groups
    "model.attention_resolutions=[3]": "resolution",        # never reached by the UNet
    "model.channel_mult=[1,2,2,2,2]": "channel_mult",       # 8x8 cannot be halved 4 times
    "+model.out_channels=1": "model.out_channels",          # learned variance needs 2C
    "module.schedule_sampler=importance": "uniform",        # lists the valid names
    "module.anneal=exp": "cosine",
    "diffusion.model_var_type=learnt": "learned_range",
    "module.nonfinite.policy=ignore": "'skip', 'stop'",
    "module.nonfinite.max_consecutive=0": "max_consecutive=0",
}


@pytest.mark.parametrize("override", sorted(INVALID))
def test_invalid_config_fails_fast_naming_the_problem(compose_cfg, override):
    cfg = compose_cfg("train", [*TINY_RUN, override, "trainer.max_steps=1"])
    started = time.time()
    with pytest.raises(Exception) as err:
        train(cfg)
    assert INVALID[override] in str(err.value)
    assert time.time() - started < 5


FAULTS = {"sigkill": 2, "sigterm and sigint": 2, "failed write": 2, "full disk": 2, "nonfinite checkpoint": 1,
          "nan batch": 3, "invalid config": len(INVALID)}


def test_atomic_writes_give_the_mode_of_an_ordinary_file(tmp_path):
    """mkstemp's temporary is 0600; the written file must be readable as open() would make it."""
    atomic.atomic_save_json(str(tmp_path / "a.json"), {"x": 1})
    with open(tmp_path / "b.json", "w") as handle:
        handle.write("{}")
    mode = (tmp_path / "b.json").stat().st_mode & 0o777
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode and mode & 0o044  # readable by others
