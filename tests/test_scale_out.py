"""Scale-out on the engines the project relies on: Lightning's DDP (validation and test
splits sharded across ranks, each image once) and Hydra sweeps through submitit."""

from __future__ import annotations

import csv
import os
import pickle
import subprocess
import sys

import pytest
import torch

import diffusion  # noqa: F401  (first: makes torchvision importable on CPU-only torch)
from diffusion.data import image_data as D
from diffusion.data import loader

from conftest import REPO
from test_train import TINY_RUN

# Odd-sized splits (93 digits each) in batches of 16: 6 batches, 48 images on rank 0 and 45
# on rank 1. A mean of per-rank means, or Lightning's mean of batch counts (93 / 2 rounded
# down in integers), would both be off here.
UNEVEN = ["data.val_fraction=0.052", "data.test_fraction=0.052", "data.batch_size=16"]


def fake_replicas(monkeypatch, world: int, rank: int) -> None:
    monkeypatch.setattr(loader, "_replicas", lambda: (world, rank))


# ------------------------------------------------------------------------ the sharded order
@pytest.mark.parametrize("num_samples, batch_size, world", [(93, 16, 2), (96, 16, 2), (10, 3, 3), (5, 5, 1)])
def test_ranks_share_the_single_process_batches_each_image_once(monkeypatch, num_samples, batch_size, world):
    fake_replicas(monkeypatch, 1, 0)
    single = list(loader.ShardedBatches(num_samples, batch_size))
    assert single == [list(range(i, min(i + batch_size, num_samples))) for i in range(0, num_samples, batch_size)]
    seen = {}
    for rank in range(world):
        fake_replicas(monkeypatch, world, rank)
        batches = list(loader.ShardedBatches(num_samples, batch_size))
        assert len(batches) == len(loader.ShardedBatches(num_samples, batch_size))
        for local, batch in enumerate(batches):
            seen[loader.global_batch_index(local)] = batch  # numbered as a single process does
    assert [seen[i] for i in range(len(single))] == single


def test_fewer_batches_than_processes_is_an_error_on_every_rank(monkeypatch):
    for rank in range(4):
        fake_replicas(monkeypatch, 4, rank)
        with pytest.raises(ValueError, match="3 batches, fewer than the 4 processes"):
            list(loader.ShardedBatches(9, 3))


def test_validation_and_test_loaders_are_sharded(monkeypatch):
    data = D.SyntheticData(image_size=4, channels=1, train_size=16, val_size=7, test_size=5, batch_size=2)
    data.setup()
    fake_replicas(monkeypatch, 2, 1)
    assert [len(labels) for _, labels in data.val_dataloader()] == [2, 1]  # batches 1 and 3 of 4
    images = torch.cat([x for x, _ in data.test_dataloader()])
    torch.testing.assert_close(images, torch.stack([data.test_set[i][0] for i in (2, 3)]), rtol=0, atol=0)


# ------------------------------------------------------------------- DDP: the same numbers
def run_train_py(out, *overrides):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # the same kernels in every process
    cmd = [sys.executable, "train.py", *TINY_RUN, *UNEVEN, "trainer.max_steps=4", "trainer.val_check_interval=4",
           "callbacks.sample_grid.num_samples=2", "callbacks.sample_grid.ddim_steps=2",
           f"hydra.run.dir={out}", *overrides]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    return {key: float(value) for row in rows for key, value in row.items() if key.startswith("test/") and value}


@pytest.mark.slow
def test_ddp_test_bpd_equals_the_single_process_value(tmp_path):
    """Two CPU processes (gloo) fit, then evaluate the test bound on half the batches each;
    the same checkpoint evaluated by one process reports the same test/bpd, to the bit."""
    two = run_train_py(tmp_path / "ddp", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                       "trainer.precision=32-true")
    checkpoint = tmp_path / "ddp" / "checkpoints" / "last.ckpt"
    one = run_train_py(tmp_path / "single", f"ckpt_path={checkpoint}")  # fit stops at once: max_steps reached
    assert set(two) == {"test/bpd", "test/prior_bpd", "test/decoder_bpd"}
    assert two == one
    assert 0 < two["test/bpd"] < 50


# --------------------------------------------------------------- Hydra sweeps via submitit
@pytest.mark.slow
def test_submitit_local_runs_a_two_job_sweep(tmp_path):
    """`-m hydra/launcher=submitit_local`: each job runs as its own submitit process and
    writes its checkpoint under the sweep folder (the SLURM launcher's code path, on this machine)."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", "diffusion/schedule=linear,cosine",
           *TINY_RUN, "callbacks.sample_grid.num_samples=2", "callbacks.sample_grid.ddim_steps=2",
           "trainer.max_steps=2", "test_after_fit=false", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    schedules = {}
    for job in ("0", "1"):
        checkpoint = torch.load(sweep / job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert checkpoint["global_step"] == 2
        schedules[job] = checkpoint["hyper_parameters"]["run_config"]["diffusion"]["betas"]["schedule_name"]
    assert schedules == {"0": "linear", "1": "cosine"}
    # each job went through submitit, which pickled its outcome beside its logs
    results = sorted((sweep / ".submitit").glob("*/*_result.pkl"))
    assert len(results) == 2
    assert all(pickle.load(open(path, "rb"))[0] == "success" for path in results)


def test_a_job_of_a_sweep_keeps_its_hydra_flags_and_settings_but_not_the_sweeps():
    from diffusion.training.ddp_launch import job_argv

    argv = ["train.py", "-m", "--config-dir", "confs", "-cn=extra", "lr=1,2", "hydra.job.chdir=true"]
    hydra = ["hydra.sweep.dir=/s", "hydra.mode=MULTIRUN", "hydra/launcher=submitit_local",
             "hydra.launcher.timeout_min=5", "hydra.job.chdir=true", "hydra.searchpath=[file:///a]"]
    assert job_argv(argv, hydra, ["lr=1", "+d=1"]) == [
        "train.py", "--config-dir", "confs", "-cn=extra", "hydra.job.chdir=true", "hydra.searchpath=[file:///a]",
        "lr=1", "+d=1"]


def test_ranks_run_this_job_restores_what_the_launcher_changed(tmp_path, monkeypatch):
    """Inside: the job's command line, `python -m` the entry module, the job's folder as Hydra's
    run folder. After it, even when the job fails: argv, __main__, the run folder, the rendezvous
    and thread settings Lightning's launcher left (simulated here), as they were."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    import __main__
    from diffusion.training.ddp_launch import ranks_run_this_job

    from conftest import compose_config

    compose_config("train", ["seed=3"], tmp_path)
    hydra = HydraConfig.instance().cfg.hydra
    with read_write(hydra), open_dict(hydra):
        hydra.mode, hydra.runtime.output_dir = "MULTIRUN", str(tmp_path / "job")
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "seed=3,4"])
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    spec, threads, run_dir = __main__.__spec__, torch.get_num_threads(), hydra.run.dir
    with pytest.raises(RuntimeError, match="the job failed"), ranks_run_this_job("diffusion.cli.train"):
        assert sys.argv[1:] == ["seed=3", f"output_dir={tmp_path}"]  # the job's overrides, no -m
        assert __main__.__spec__.name == "diffusion.cli.train"
        assert HydraConfig.get().run.dir == str(tmp_path / "job")
        os.environ.update(LOCAL_RANK="0", OMP_NUM_THREADS="1")  # as Lightning's launcher does
        torch.set_num_threads(1)
        raise RuntimeError("the job failed")
    assert sys.argv == ["train.py", "-m", "seed=3,4"] and __main__.__spec__ is spec
    assert "LOCAL_RANK" not in os.environ and os.environ["OMP_NUM_THREADS"] == "7"
    assert torch.get_num_threads() == threads and HydraConfig.get().run.dir == run_dir


def test_ranks_made_outside_keep_their_process_group(tmp_path, monkeypatch):
    """Under torchrun or SLURM (LOCAL_RANK set before the job) every rank runs the sweep itself:
    the group is kept for the next job (Lightning reuses it); ranks started for the job end with it."""
    import torch.distributed as dist
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    from diffusion.training.ddp_launch import ranks_run_this_job

    from conftest import compose_config

    compose_config("train", [], tmp_path)
    hydra = HydraConfig.instance().cfg.hydra
    with read_write(hydra), open_dict(hydra):
        hydra.mode, hydra.runtime.output_dir = "MULTIRUN", str(tmp_path)
    monkeypatch.setenv("LOCAL_RANK", "0")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        with ranks_run_this_job("diffusion.cli.train"):
            pass
        assert dist.is_initialized()
        monkeypatch.delenv("LOCAL_RANK")
        with ranks_run_this_job("diffusion.cli.train"):
            os.environ["LOCAL_RANK"] = "0"  # what Lightning's launcher sets when it starts the ranks
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "submitit_local"])
def test_ddp_inside_a_sweep_runs_each_job_on_its_own_ranks(tmp_path, launcher):
    """`-m` with `trainer=ddp`: Lightning starts rank 1 of each job by running the process's
    command again. Without `training.ddp_launch`, under the basic launcher that command was
    the whole sweep (rank 1 ran every job, and the parent's second job started no rank of its
    own), and under submitit it was submitit's worker, which failed on the arguments."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", f"hydra/launcher={launcher}", "diffusion/schedule=linear,cosine",
           *TINY_RUN, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.precision=32-true",
           "trainer.max_steps=2", "test_after_fit=false", "callbacks.sample_grid.num_samples=2",
           "callbacks.sample_grid.ddim_steps=2", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("Launching 2 jobs") <= 1  # no rank ran the sweep again
    for job, schedule in (("0", "linear"), ("1", "cosine")):
        for log, rank in (("train.log", "GLOBAL_RANK: 0, MEMBER: 1/2"), ("train_ddp_process_1.log", "GLOBAL_RANK: 1, MEMBER: 2/2")):
            assert f"Initializing distributed: {rank}" in (sweep / job / log).read_text(), (job, log)
        checkpoint = torch.load(sweep / job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert checkpoint["global_step"] == 2
        assert checkpoint["hyper_parameters"]["run_config"]["diffusion"]["betas"]["schedule_name"] == schedule
