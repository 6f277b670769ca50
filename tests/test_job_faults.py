"""Faults of sample.py, evaluate.py and the converter, through their real entry points.

- kill -9 at random moments: a resumed sample.py run ends with the uninterrupted run's npz,
  bit for bit; a killed evaluate.py metric=nll run leaves no JSON and a rerun gives the
  same numbers;
- a full disk (a small tmpfs) under the sample files: a one-line error, exit status 2, no
  npz or grid, the finished shards kept for a rerun;
- shards are keyed (their manifest): a resume with settings that change the images is
  refused, naming what changed; two writers on one folder: the second is refused with the
  first one's pid, and a killed writer's lock blocks nobody;
- a table of bad inputs across the three entry points: exit status 2, ``error: ...`` naming
  the key, value or file as the last line of stderr, no traceback, no output file.

Subprocesses run in the test's temporary folder with hydra.run.dir (hence output_dir) and
cache_dir inside it; nothing is written anywhere else.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from diffusion.checkpoint import build_unet, checkpoint_dict, save_checkpoint, split_model_config
from diffusion.convert import main as convert_main
from diffusion.jobs import sample as sample_job
from diffusion.jobs.errors import exit_on_user_error
from diffusion.jobs.evaluate import evaluate
from diffusion.jobs.sample import sample
from diffusion.jobs.shards import ShardsMismatchError
from diffusion.nets.convert import unet_kwargs_from_flags
from diffusion.nets.unet import UNet
from diffusion.utils.lock import FolderBusyError, folder_lock

from conftest import REPO, TINY_UNET, compose_config

SAMPLE, EVALUATE = str(REPO / "sample.py"), str(REPO / "evaluate.py")
CONVERT = ["-m", "diffusion.convert"]
# A one-level UNet without attention on the 8x8 digits, T = 50: each model call is cheap.
TINY_NET = [*TINY_UNET, "model.channel_mult=[1]", "model.attention_resolutions=[]",
            "diffusion.betas.num_diffusion_timesteps=50"]
# Sampling runs of the kill tests: 24 batches of 2 images, 4 DDIM steps each.
KILL_SAMPLING = ["sampler=ddim10", "sampler.steps=4", "num_samples=48", "batch_size=2", "progress=false", "device=cpu"]
KILL_NLL = ["metric=nll", "max_batches=1", "batch_size=8", "progress=false", "device=cpu"]
CONVERT_FLAGS = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1", "--channel_mult", "1",
                 "--attention_resolutions", "8", "--num_heads", "2", "--diffusion_steps", "50"]


# ------------------------------------------------------------------------------ fixtures
def write_tiny_checkpoint(path: Path, seed: int = 0) -> str:
    """A checkpoint in the layout train.py writes (run config, data shape, weights) of a
    randomly initialised tiny UNet: no training needed to exercise the jobs."""
    cfg = compose_config("train", TINY_NET, path.parent / "run")
    run_config = OmegaConf.to_container(cfg, resolve=True)
    diffusion = sample_job.hydra.utils.instantiate(run_config["diffusion"])
    unet_config, _ = split_model_config(run_config["model"])
    torch.manual_seed(seed)
    net = build_unet(sample_job.hydra.utils.instantiate(unet_config, _partial_=True), diffusion,
                     image_size=8, in_channels=1, num_classes=None)
    save_checkpoint(checkpoint_dict(net.state_dict(), run_config, image_size=8, in_channels=1,
                                    num_classes=None, global_step=0), path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Inputs shared by the module's tests: a tiny checkpoint, broken checkpoints and sample
    files, an improved-diffusion state dict for the converter, a regular file."""
    root = tmp_path_factory.mktemp("inputs")
    paths = {"ckpt": write_tiny_checkpoint(root / "tiny.ckpt")}
    torch.save([1, 2, 3], root / "list.ckpt")
    torch.save({"step": 3}, root / "dict.pt")
    np.savez(root / "float.npz", arr_0=np.zeros((4, 8, 8, 1), np.float32))
    np.savez(root / "no_arr0.npz", images=np.zeros((4, 8, 8, 1), np.uint8))
    (root / "corrupt.pt").write_bytes(b"\x80\x02 not a state dict")
    (root / "a_file").write_text("a regular file, not a folder")
    flags = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1", attention_resolutions="8",
                 num_heads=2)
    torch.save(UNet(**unet_kwargs_from_flags(**flags)).state_dict(), root / "model.pt")
    for name in ("list.ckpt", "dict.pt", "float.npz", "no_arr0.npz", "corrupt.pt", "a_file", "model.pt"):
        paths[name.split(".")[0]] = str(root / name)
    return paths


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def cli(tmp_path: Path, entry: list[str], *args: str, cache: bool = True) -> list[str]:
    """The command line of an entry point writing under ``tmp_path`` only."""
    command = [sys.executable, *entry, *args]
    if entry != CONVERT:
        command.append(f"hydra.run.dir={tmp_path / 'run'}")
    if entry == [EVALUATE] and cache:
        command.append(f"cache_dir={tmp_path / 'cache'}")
    return command


def run(command: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


def start(command: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and process.poll() is None:
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def leftovers(folder: Path) -> list[str]:
    """Temporaries, shard folders and lock files under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.endswith(".tmp") or p.name.endswith("_shards") or p.name == ".lock")


# ------------------------------------------------------------------------------ kill -9
@dataclass
class Reference:
    result: np.ndarray | dict
    seconds: float  # from the moment the run's work began (its lock, its manifest) to its result


def uninterrupted(command: list[str], cwd: Path, started: Path, result: Path) -> float:
    """Run ``command`` to its end; the seconds from ``started`` to ``result`` appearing."""
    process = start(command, cwd)
    wait_for(started.exists, process)
    began = time.monotonic()
    wait_for(result.exists, process)
    seconds = time.monotonic() - began
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return seconds


def kill_at_random_moment(command: list[str], cwd: Path, started: Path, seconds: float, seed: int,
                          kills: int) -> None:
    """Start ``command``, wait until its work begins, and kill -9 it a random time later: in
    the ``seed``-th of ``kills`` equal parts of 1.2 times the work's ``seconds``, so that the
    seeds together cover its beginning, middle and end, and the writing of its result."""
    process = start(command, cwd)
    wait_for(started.exists, process)
    time.sleep(1.2 * seconds * (seed + random.Random(seed).random()) / kills)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)


@pytest.fixture(scope="module")
def sampling_reference(files, tmp_path_factory) -> Reference:
    out = tmp_path_factory.mktemp("sampling_reference")
    command = cli(out, [SAMPLE], f"ckpt={files['ckpt']}", *KILL_SAMPLING)
    seconds = uninterrupted(command, out, out / "run" / "samples_48x8x8x1_shards" / "manifest.json",
                            out / "run" / "samples_48x8x8x1.npz")
    return Reference(np.load(out / "run" / "samples_48x8x8x1.npz")["arr_0"], seconds)


SAMPLING_KILLS = 3


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(SAMPLING_KILLS))
def test_sampling_killed_at_a_random_moment_resumes_bit_for_bit(files, sampling_reference, tmp_path, seed):
    command = cli(tmp_path, [SAMPLE], f"ckpt={files['ckpt']}", *KILL_SAMPLING)
    run_dir = tmp_path / "run"
    npz = run_dir / "samples_48x8x8x1.npz"
    kill_at_random_moment(command, tmp_path, run_dir / "samples_48x8x8x1_shards" / "manifest.json",
                          sampling_reference.seconds, seed, SAMPLING_KILLS)
    if npz.exists():  # killed after the (atomic) write: then it is whole
        np.testing.assert_array_equal(np.load(npz)["arr_0"], sampling_reference.result)
    resumed = run(command, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    np.testing.assert_array_equal(np.load(npz)["arr_0"], sampling_reference.result)
    assert leftovers(run_dir) == []


@pytest.fixture(scope="module")
def nll_reference(files, tmp_path_factory) -> Reference:
    out = tmp_path_factory.mktemp("nll_reference")
    command = cli(out, [EVALUATE], f"ckpt={files['ckpt']}", *KILL_NLL)
    seconds = uninterrupted(command, out, out / "run" / ".lock", out / "run" / "nll.json")
    return Reference(json.loads((out / "run" / "nll.json").read_text()), seconds)


EVALUATION_KILLS = 2


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(EVALUATION_KILLS))
def test_evaluation_killed_at_a_random_moment_leaves_no_json_and_reruns_alike(files, nll_reference, tmp_path,
                                                                              seed):
    command = cli(tmp_path, [EVALUATE], f"ckpt={files['ckpt']}", *KILL_NLL)
    result = tmp_path / "run" / "nll.json"
    kill_at_random_moment(command, tmp_path, tmp_path / "run" / ".lock", nll_reference.seconds, seed,
                          EVALUATION_KILLS)
    if result.exists():  # killed after the (atomic) write: then it is whole
        assert json.loads(result.read_text()) == nll_reference.result
    rerun = run(command, tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(result.read_text()) == nll_reference.result
    assert leftovers(tmp_path / "run") == []


# ------------------------------------------------------------------------------ a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 160 KiB tmpfs: room for the 16 shards of 64 8x8 images (2 pages each), not for the
    npz that merges them (17 pages)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root in a container that allows it): {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_a_full_disk_keeps_the_shards_and_writes_no_partial_file(files, small_disk, compose_cfg, tmp_path):
    settings = [f"ckpt={files['ckpt']}", "sampler=ddim10", "sampler.steps=2", "num_samples=1024", "batch_size=64",
                "progress=false", "device=cpu"]
    result = run(cli(tmp_path, [SAMPLE], *settings, f"output_dir={small_disk}"), tmp_path)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: writing {small_disk}/samples_1024x8x8x1.npz failed (No space left on device)")
    assert "finished batches are kept" in last and "Traceback" not in result.stderr
    assert sorted(os.listdir(small_disk)) == ["samples_1024x8x8x1_shards"]  # no npz, png, temporary or lock
    shards = sorted(os.listdir(small_disk / "samples_1024x8x8x1_shards"))
    assert shards == [f"batch_{i:06d}.npz" for i in range(16)] + ["manifest.json"]
    # With room again, the same command finishes from the kept shards.
    subprocess.run(["mount", "-o", "remount,size=1m", str(small_disk)], check=True)
    out = sample(compose_cfg("sample", settings, output_dir=small_disk))
    assert out["num_images"] == 1024 and sorted(os.listdir(small_disk)) == [
        "samples_1024x8x8x1.npz", "samples_1024x8x8x1.png"]


# ------------------------------------------------------------------------------ keyed shards
def interrupted_run(cfg, monkeypatch) -> None:
    """Run the sample job to its second batch and stop it there, as a pre-emption would."""
    real = sample_job.sample_batch
    calls = []

    def stop_at_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated pre-emption")
        return real(*args, **kwargs)

    monkeypatch.setattr(sample_job, "sample_batch", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        sample(cfg)
    monkeypatch.setattr(sample_job, "sample_batch", real)


SMALL_RUN = ["sampler=ddim10", "sampler.steps=3", "num_samples=4", "batch_size=2", "progress=false", "device=cpu"]


@pytest.mark.parametrize("change, named", [
    ("seed=1", "seed 0 -> 1"),
    ("batch_size=1", "batch_size 2 -> 1"),
    ("sampler.steps=4", "sampler.steps 3 -> 4"),
    ("clip_denoised=false", "clip_denoised true -> false"),
    ("other weights", "the checkpoint's weights"),
])
def test_a_resume_with_settings_that_change_the_images_is_refused(files, compose_cfg, tmp_path, monkeypatch,
                                                                   change, named):
    """A run resumed into the same folder with another seed (or anything else that changes
    the images) mixed its images with the earlier run's shards: now it is refused."""
    ckpt = tmp_path / "model.ckpt"
    write_tiny_checkpoint(ckpt)
    out = tmp_path / "out"
    interrupted_run(compose_cfg("sample", [f"ckpt={ckpt}", "seed=0", *SMALL_RUN], output_dir=out), monkeypatch)
    if change == "other weights":  # training went on and rewrote the checkpoint in place
        write_tiny_checkpoint(ckpt, seed=1)
        change = "seed=0"
    cfg = compose_cfg("sample", [f"ckpt={ckpt}", "seed=0", *SMALL_RUN, change], output_dir=out)
    with pytest.raises(ShardsMismatchError, match="1 finished batch") as refused:
        sample(cfg)
    assert named in str(refused.value) and f"delete {out / 'samples_4x8x8x1_shards'}" in str(refused.value)
    assert not list(out.glob("*.npz")) and not list(out.glob("*.png"))


def test_a_resume_with_the_same_weights_elsewhere_goes_on(files, compose_cfg, tmp_path, monkeypatch):
    """The shards are keyed by the checkpoint's content, not its path: a copy resumes them."""
    first, copy = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    write_tiny_checkpoint(first)
    copy.write_bytes(first.read_bytes())
    reference = np.load(sample(compose_cfg("sample", [f"ckpt={first}", *SMALL_RUN],
                                           output_dir=tmp_path / "ref"))["npz"])["arr_0"]
    interrupted_run(compose_cfg("sample", [f"ckpt={first}", *SMALL_RUN], output_dir=tmp_path / "out"), monkeypatch)
    resumed = sample(compose_cfg("sample", [f"ckpt={copy}", *SMALL_RUN], output_dir=tmp_path / "out"))
    np.testing.assert_array_equal(np.load(resumed["npz"])["arr_0"], reference)
    assert leftovers(tmp_path / "out") == []


def test_temporaries_of_a_killed_write_are_cleared_on_resume(files, compose_cfg, tmp_path, monkeypatch):
    """kill -9 during an atomic write leaves its temporary; the next run (holding the lock)
    removes those of its own files, so a finished folder holds the npz and grid only."""
    out = tmp_path / "out"
    cfg = compose_cfg("sample", [f"ckpt={files['ckpt']}", *SMALL_RUN], output_dir=out)
    interrupted_run(cfg, monkeypatch)
    (out / "samples_4x8x8x1_shards" / ".batch_000001.npz.k1ll3d.tmp").write_bytes(b"half a shard")
    (out / ".samples_4x8x8x1.npz.k1ll3d.tmp").write_bytes(b"half an npz")
    sample(cfg)
    assert sorted(os.listdir(out)) == ["samples_4x8x8x1.npz", "samples_4x8x8x1.png"]


def test_a_failed_grid_write_takes_the_npz_back(files, compose_cfg, tmp_path, monkeypatch):
    """The npz and the grid are written both or neither; the shards stay for a rerun."""
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sample_job, "save_image_grid", full_disk)
    out = tmp_path / "out"
    with pytest.raises(OSError, match=r"writing .*samples_4x8x8x1\.png failed \(No space left on device\)"):
        sample(compose_cfg("sample", [f"ckpt={files['ckpt']}", *SMALL_RUN], output_dir=out))
    assert sorted(os.listdir(out)) == ["samples_4x8x8x1_shards"]


def test_shards_without_a_manifest_are_refused_and_an_empty_folder_is_taken_over(files, compose_cfg, tmp_path):
    shards = tmp_path / "out" / "samples_4x8x8x1_shards"
    shards.mkdir(parents=True)
    (shards / "manifest.json").write_text('{"key": {"seed": 7}}')  # another run's, with no shard done
    cfg = compose_cfg("sample", [f"ckpt={files['ckpt']}", *SMALL_RUN], output_dir=tmp_path / "out")
    assert sample(cfg)["num_images"] == 4
    shards.mkdir()
    np.savez(shards / "batch_000000.npz", arr_0=np.zeros((2, 8, 8, 1), np.uint8))  # an older version's shard
    with pytest.raises(ShardsMismatchError, match="no readable manifest"):
        sample(cfg)


# ------------------------------------------------------------------------------ two writers
HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("held", flush=True)
time.sleep(600)
"""


def test_folder_lock_refuses_a_second_holder_and_survives_a_killed_one(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / ".lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusyError, match=rf"being written by another process \(pid {holder.pid}\)"):
            with folder_lock(tmp_path):
                pass
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock, the file stays
        holder.wait()
    assert (tmp_path / ".lock").exists()
    with folder_lock(tmp_path) as path, folder_lock(tmp_path):  # re-entrant within a process
        assert open(path).read() == f"{os.getpid()}\n"
    assert not (tmp_path / ".lock").exists()  # a clean exit removes it


@pytest.mark.slow
def test_a_second_sample_process_on_one_folder_is_refused(files, tmp_path):
    """Two sample.py processes on one folder: one died with a raw FileNotFoundError on a
    shard; now the second is refused up front, naming the first one's pid."""
    settings = [f"ckpt={files['ckpt']}", "sampler=ddim10", "num_samples=400", "batch_size=4", "progress=false"]
    first = start(cli(tmp_path, [SAMPLE], *settings), tmp_path)
    try:
        wait_for((tmp_path / "run" / "samples_400x8x8x1_shards" / "manifest.json").exists, first)
        assert first.poll() is None, first.stderr.read()
        second = run(cli(tmp_path, [SAMPLE], *settings), tmp_path)
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert second.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'run'} is being written by another process (pid {first.pid}); wait for it to "
        "finish, or pass another output_dir")
    with folder_lock(tmp_path / "run"):  # the killed writer's lock blocks nobody
        pass


# ------------------------------------------------------------------------------ bad inputs
@dataclass(frozen=True)
class Bad:
    entry: str  # sample | evaluate | convert
    args: tuple[str, ...]
    named: tuple[str, ...]  # what the error line must name ({placeholders} filled from `files`)


def bad(entry: str, *args: str, named: str | tuple[str, ...]) -> Bad:
    return Bad(entry, args, (named,) if isinstance(named, str) else named)


CKPT = "ckpt={ckpt}"
# Run as real subprocesses of the entry points (slow: ~3 s of start-up each).
SUBPROCESS_CASES = {
    "sample num_samples=0": bad("sample", CKPT, "num_samples=0", named="num_samples=0"),
    "sample ckpt holds a list": bad("sample", "ckpt={list}", named=("{list}", "holds a list")),
    "sample sampler.steps=-1": bad("sample", CKPT, "sampler=ddim10", "sampler.steps=-1", named="sampler.steps=-1"),
    "sample output_dir under a file": bad("sample", CKPT, "output_dir={a_file}/out",
                                          named=("output_dir={a_file}/out", "not a writable folder")),
    "sample unknown sampler": bad("sample", CKPT, "sampler=ddim51", named=("sampler/ddim51", "ddim50")),
    "evaluate ckpt holds a list": bad("evaluate", "ckpt={list}", named=("{list}", "holds a list")),
    "evaluate samples float32": bad("evaluate", CKPT, "metric=fid", "samples={float}",
                                    named=("samples={float}", "float32", "uint8")),
    "convert missing input": bad("convert", "{tmp}/missing.pt", "{tmp}/out.ckpt", named="{tmp}/missing.pt"),
    "convert input holds a list": bad("convert", "{list}", "{tmp}/out.ckpt", named=("{list}", "holds a list")),
    "convert malformed flag value": bad("convert", "{model}", "{tmp}/out.ckpt", "--attention_resolutions", "4,x",
                                        named=("--attention_resolutions", "4,x")),
    "convert output folder missing": bad("convert", "{model}", "{tmp}/nowhere/out.ckpt",
                                         named=("{tmp}/nowhere", "does not exist")),
}
# Run in this process through the same error path (`exit_on_user_error`, convert's main).
IN_PROCESS_CASES = {
    "sample num_samples=-4": bad("sample", CKPT, "num_samples=-4", named="num_samples=-4"),
    "sample batch_size=0": bad("sample", CKPT, "batch_size=0", named="batch_size=0"),
    "sample batch_size=2.5": bad("sample", CKPT, "batch_size=2.5", named="batch_size=2.5"),
    "sample seed=-1": bad("sample", CKPT, "seed=-1", named="seed=-1"),
    "sample seed=abc": bad("sample", CKPT, "seed=abc", named="seed='abc'"),
    "sample weights=foo": bad("sample", CKPT, "weights=foo", named="weights='foo'"),
    "sample weights=0.5 absent": bad("sample", CKPT, "weights=0.5", named=("weights=0.5", "available: raw")),
    "sample precision=64": bad("sample", CKPT, "precision=64", named="precision='64'"),
    "sample grid_size=0": bad("sample", CKPT, "grid_size=0", named="grid_size=0"),
    "sample class_labels unconditional": bad("sample", CKPT, "class_labels=[1]", named=("class_labels", "unconditional")),
    "sample class_labels=[-1]": bad("sample", CKPT, "class_labels=[-1]", named="class_labels=[-1]"),
    "sample device=tpu": bad("sample", CKPT, "device=tpu", named="device='tpu'"),
    "sample device=cuda:7": bad("sample", CKPT, "device=cuda:7", named="device=cuda:7"),
    "sample num_devices=0": bad("sample", CKPT, "num_devices=0", named="num_devices=0"),
    "sample sampler.eta=2": bad("sample", CKPT, "sampler=ddim10", "sampler.eta=2", named="sampler.eta=2"),
    "sample sampler.skip=bogus": bad("sample", CKPT, "sampler=ddim10", "sampler.skip=bogus",
                                     named="sampler.skip='bogus'"),
    "sample more steps than T": bad("sample", CKPT, "sampler=ddim100", named=("sampler.steps=100", "only 50")),
    "sample guidance unconditional": bad("sample", CKPT, "sampler.guidance_scale=3",
                                         named=("sampler.guidance_scale=3", "unconditional")),
    "sample ckpt missing": bad("sample", "ckpt={tmp}/nope.ckpt", named="{tmp}/nope.ckpt"),
    "sample ckpt corrupt": bad("sample", "ckpt={corrupt}", named=("cannot read checkpoint", "{corrupt}")),
    "sample ckpt not set": bad("sample", named="ckpt is not set"),
    "evaluate metric=bogus": bad("evaluate", CKPT, "metric=bogus", named="metric='bogus'"),
    "evaluate split=dev": bad("evaluate", CKPT, "split=dev", named="split='dev'"),
    "evaluate max_batches=0": bad("evaluate", CKPT, "max_batches=0", named="max_batches=0"),
    "evaluate respacing=abc": bad("evaluate", CKPT, "respacing=abc", named="respacing"),
    "evaluate samples without arr_0": bad("evaluate", CKPT, "metric=fid", "samples={no_arr0}",
                                          named=("samples={no_arr0}", "arr_0")),
    "evaluate samples missing": bad("evaluate", CKPT, "metric=fid", "samples={tmp}/missing.npz",
                                    named="samples={tmp}/missing.npz"),
    "evaluate inception_weights missing": bad("evaluate", CKPT, "metric=fid", "data=cifar10",
                                              "inception_weights={tmp}/nope.pth",
                                              named=("inception_weights", "{tmp}/nope.pth")),
    "evaluate cache_dir under a file": bad("evaluate", CKPT, "metric=fid", "cache_dir={a_file}/cache",
                                           named="cache_dir={a_file}/cache"),
    "convert input not a state dict": bad("convert", "{dict}", "{tmp}/out.ckpt", named=("{dict}", "not a bare state dict")),
    "convert input corrupt": bad("convert", "{corrupt}", "{tmp}/out.ckpt", named=("{corrupt}", "damaged")),
    "convert flags do not fit": bad("convert", "{model}", "{tmp}/out.ckpt", "--num_channels", "64",
                                    named=("{model}", "does not fit", "num_channels")),
    "convert unknown schedule": bad("convert", "{model}", "{tmp}/out.ckpt", "--noise_schedule", "bogus",
                                    named=("--noise_schedule bogus", "cosine")),
    "convert output is a folder": bad("convert", "{model}", "{tmp}", named=("{tmp} is a folder")),
    "convert output folder under a file": bad("convert", "{model}", "{a_file}/out.ckpt", named="{a_file}"),
}


def fill(text: str, files: dict[str, str], tmp_path: Path) -> str:
    return text.format(tmp=tmp_path, **files)


def convert_args(case: Bad, files, tmp_path) -> list[str]:
    args = [fill(a, files, tmp_path) for a in case.args]
    return args[:2] + CONVERT_FLAGS + args[2:]  # the case's flags come last and win


def assert_refused(status: int, stderr: str, case: Bad, files, tmp_path: Path) -> None:
    lines = stderr.strip().splitlines()
    assert status == 2, stderr
    assert "Traceback" not in stderr, stderr
    if lines[0].startswith("usage:"):  # argparse: its usage line, then "<prog>: error: ..."
        assert case.entry == "convert" and ": error: " in lines[-1], stderr
    else:
        assert lines[-1].startswith("error: "), stderr
    for named in case.named:
        assert fill(named, files, tmp_path) in lines[-1], stderr
    written = [p for p in tmp_path.rglob("*") if p.suffix in (".npz", ".png", ".json", ".ckpt", ".tmp", ".pth")
               or p.name.endswith("_shards") or p.name == ".lock"]
    assert written == [], written


@pytest.mark.slow
@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_through_the_real_entry_point(files, tmp_path, name):
    case = SUBPROCESS_CASES[name]
    if case.entry == "convert":
        command = [sys.executable, *CONVERT, *convert_args(case, files, tmp_path)]
    else:
        entry = [SAMPLE] if case.entry == "sample" else [EVALUATE]
        command = cli(tmp_path, entry, *(fill(a, files, tmp_path) for a in case.args))
    result = run(command, tmp_path)
    assert_refused(result.returncode, result.stderr, case, files, tmp_path)


@pytest.mark.parametrize("name", IN_PROCESS_CASES)
def test_bad_input_through_the_error_path(files, compose_cfg, tmp_path, capsys, name):
    case = IN_PROCESS_CASES[name]
    with pytest.raises(SystemExit) as exited:
        if case.entry == "convert":
            convert_main(convert_args(case, files, tmp_path))
        else:
            overrides = [fill(a, files, tmp_path) for a in case.args]
            if case.entry == "evaluate" and not any(a.startswith("cache_dir=") for a in overrides):
                overrides.append(f"cache_dir={tmp_path / 'cache'}")
            with exit_on_user_error(ValueError):  # as cli/sample.py and cli/evaluate.py run the jobs
                cfg = compose_cfg(case.entry, [*overrides, "progress=false"], output_dir=tmp_path / "out")
                (sample if case.entry == "sample" else evaluate)(cfg)
    assert_refused(exited.value.code, capsys.readouterr().err, case, files, tmp_path)


def test_the_table_is_large_and_distinct():
    cases = [*SUBPROCESS_CASES.values(), *IN_PROCESS_CASES.values()]
    assert len(SUBPROCESS_CASES) >= 10 and len(cases) >= 20 and len(set(cases)) == len(cases)
    assert {case.entry for case in SUBPROCESS_CASES.values()} == {"sample", "evaluate", "convert"}
