"""End-to-end training through `diffusion.training.run.train` on the embedded digits."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import hydra
import pytest
import torch

from diffusion.training.module import LOSS_HISTORY_FLUSH_STEPS
from diffusion.training.run import train

from conftest import REPO, TINY_UNET

# A tiny UNet on the digits with a 50-step process: seconds per run on a CPU.
TINY_RUN = [
    *TINY_UNET,
    "model.attention_resolutions=[4]",
    "diffusion.betas.num_diffusion_timesteps=50",
    "data.batch_size=16",
    "~callbacks.progress_bar",
    "trainer.log_every_n_steps=1",
]


def test_fast_dev_run(compose_cfg):
    cfg = compose_cfg("train", [*TINY_RUN, "+trainer.fast_dev_run=true"])
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert 0 < metrics["test/bpd"] < 50


def test_run_writes_config_checkpoints_metrics_and_grids(compose_cfg, tmp_path):
    out = tmp_path / "run"
    cfg = compose_cfg(
        "train",
        [
            *TINY_RUN,
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            "trainer.limit_val_batches=2",
            "callbacks.model_checkpoint.every_n_train_steps=3",
            "callbacks.sample_grid.every_n_steps=3",
            "callbacks.sample_grid.num_samples=4",
            "callbacks.sample_grid.ddim_steps=5",
            "data.batch_size=8",
            "+trainer.limit_test_batches=1",
        ],
        output_dir=out,
    )
    metrics = train(cfg)
    assert (out / "config.yaml").is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file()
    rows = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/bpd") for r in rows)
    assert any(name.endswith(".png") for name in os.listdir(out / "samples"))
    with open(out / "metrics.png", "rb") as handle:  # MetricsPlot, redrawn after the test
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert metrics["val/bpd"] > 0 and metrics["test/bpd"] > 0

    checkpoint = torch.load(
        out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert checkpoint["global_step"] == 6
    assert set(checkpoint["ema"]) == {"0.99"}  # the quickstart's rate
    config = checkpoint["hyper_parameters"]["run_config"]
    assert config["diffusion"]["model_var_type"] == "learned_range"
    assert checkpoint["hyper_parameters"]["image_size"] == 8


def _run(compose_cfg, out, steps, extra=()):
    cfg = compose_cfg(
        "train",
        [
            *TINY_RUN,
            f"trainer.max_steps={steps}",
            "trainer.val_check_interval=1000",
            "module.schedule_sampler=loss-second-moment",
            "module.warmup_steps=3",
            "module.anneal=linear",
            "callbacks.model_checkpoint.every_n_train_steps=4",
            "callbacks.model_checkpoint.save_top_k=-1",
            "~callbacks.sample_grid",
            "test_after_fit=false",
            "trainer.limit_val_batches=0",
            *extra,
        ],
        output_dir=out,
    )
    return cfg


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_resume_restores_step_optimizer_ema_and_sampler(compose_cfg, tmp_path):
    """Interrupted at step 4 and resumed: the state at step 4 equals the uninterrupted run's,
    and the resumed run finishes at the same step with the same learning-rate schedule."""
    full = tmp_path / "full"
    train(_run(compose_cfg, full, 8))
    step4 = full / "checkpoints" / "step0000004.ckpt"
    assert step4.is_file()

    resumed = tmp_path / "resumed"
    train(_run(compose_cfg, resumed, 8, [f"ckpt_path={step4}"]))
    a, b = _load(full / "checkpoints" / "last.ckpt"), _load(resumed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 8
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]
    assert (
        a["optimizer_states"][0]["state"][0]["step"] == b["optimizer_states"][0]["state"][0]["step"]
    )
    # The loss-aware sampler's history grew from the restored one, not from scratch.
    assert b["schedule_sampler"]["loss_counts"].sum() == a["schedule_sampler"]["loss_counts"].sum()
    # The EMA of the resumed run started from the restored average (n_averaged continues).
    ema_state = [v for k, v in b["callbacks"].items() if "EMA" in k][0]
    assert int(ema_state["n_averaged"]["0.99"]) == 8


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    """`trainer=ddp` with two CPU processes (gloo) trains a few steps through train.py."""
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "train.py",
        *TINY_RUN,
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        f"trainer.max_steps={LOSS_HISTORY_FLUSH_STEPS}",  # one hand-over to the sampler
        "data.batch_size=4",
        "test_after_fit=false",
        "trainer.limit_val_batches=0",
        "module.schedule_sampler=loss-second-moment",
        f"hydra.run.dir={out}",
    ]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = _load(out / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == LOSS_HISTORY_FLUSH_STEPS
    # Both ranks' losses reached the sampler: 2 ranks x 16 steps x 4 examples.
    assert checkpoint["schedule_sampler"]["loss_counts"].sum() == 2 * LOSS_HISTORY_FLUSH_STEPS * 4
    assert checkpoint["pending_losses"] == []


def test_loss_aware_sampler_learns_in_batches_of_steps_without_losing_any(compose_cfg):
    from diffusion.training.run import build_module

    cfg = compose_cfg("train", [*TINY_RUN, "module.schedule_sampler=loss-second-moment"])
    module = build_module(cfg, hydra.utils.instantiate(cfg.data))
    sampler, seen = module.schedule_sampler, []
    sampler.update_with_local_losses = lambda ts, losses: seen.append((ts.tolist(), losses.tolist()))
    batches = [(torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)) for _ in range(LOSS_HISTORY_FLUSH_STEPS + 3)]
    for step, batch in enumerate(batches):
        with torch.no_grad():
            module.training_step(batch, step)
        assert len(seen) == (step + 1) // LOSS_HISTORY_FLUSH_STEPS  # one hand-over per 16 steps
    assert len(seen[0][0]) == 4 * LOSS_HISTORY_FLUSH_STEPS and len(module._pending_losses) == 3
    module.flush_loss_history()
    assert sum(len(ts) for ts, _ in seen) == 4 * len(batches)


def test_retain_freed_memory_serves_large_tensors_from_the_reusable_heap():
    import ctypes

    from diffusion.utils.host_memory import retain_freed_memory

    if not sys.platform.startswith("linux"):
        assert retain_freed_memory() is False
        return
    fields = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in fields]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    assert retain_freed_memory() is True
    mmapped, in_use = libc.mallinfo2().hblkhd, libc.mallinfo2().uordblks
    block = torch.empty(16 * 2**20 // 4)  # 16 MiB: glibc's default would mmap it
    assert libc.mallinfo2().hblkhd == mmapped and libc.mallinfo2().uordblks >= in_use + 16 * 2**20
    del block
