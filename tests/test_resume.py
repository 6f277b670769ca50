"""Exact resume: interrupted at a checkpoint and resumed, a run repeats the uninterrupted
run's losses bit for bit (CPU), mid-epoch and across an epoch boundary."""

from __future__ import annotations

import csv

import pytest
import torch

from diffusion.data.loader import EpochPermutation, ResumableDataLoader
from diffusion.training.run import train

from test_train import TINY_RUN


def losses(folder):
    rows = csv.DictReader(open(folder / "csv" / "metrics.csv"))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


def epoch_rows(folder):
    """The epoch-level rows of metrics.csv: the loss per quarter of the t range, by step."""
    rows = csv.DictReader(open(folder / "csv" / "metrics.csv"))
    return {int(r["step"]): [r[f"train/loss_q{q}"] for q in range(4)] for r in rows if r.get("train/loss_q0")}


def run(compose_cfg, out, steps, batch, every, extra=()):
    cfg = compose_cfg("train", [
        *TINY_RUN, f"trainer.max_steps={steps}", f"data.batch_size={batch}", "trainer.val_check_interval=1000",
        "trainer.limit_val_batches=0", "test_after_fit=false", "~callbacks.sample_grid",
        "module.schedule_sampler=loss-second-moment", "module.warmup_steps=2", "module.anneal=cosine",
        "model.dropout=0.1", f"callbacks.model_checkpoint.every_n_train_steps={every}",
        "callbacks.model_checkpoint.save_top_k=-1", *extra,
    ], output_dir=out)
    train(cfg)
    return losses(out)


@pytest.mark.parametrize("batch, stop, total", [(16, 4, 8), (128, 8, 16)])  # 89 / 11 batches an epoch
def test_resumed_run_repeats_the_uninterrupted_losses(compose_cfg, tmp_path, batch, stop, total):
    full = run(compose_cfg, tmp_path / "full", total, batch, stop)
    checkpoint = tmp_path / "full" / "checkpoints" / f"step{stop:07d}.ckpt"
    resumed = run(compose_cfg, tmp_path / "resumed", total, batch, stop, [f"ckpt_path={checkpoint}"])
    after = {s: v for s, v in full.items() if s >= stop}
    assert len(after) == total - stop
    assert {s: resumed[s] for s in after} == after  # exact equality, every step
    # The epoch-level means of the epoch that spans the resume include the steps before it.
    full_epochs, resumed_epochs = epoch_rows(tmp_path / "full"), epoch_rows(tmp_path / "resumed")
    assert resumed_epochs and resumed_epochs == {s: v for s, v in full_epochs.items() if s >= stop}
    last = [torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False) for run in ("full", "resumed")]
    assert last[0]["global_step"] == last[1]["global_step"] == total
    ema_full, ema_resumed = last[0]["ema"], last[1]["ema"]
    for key, value in ema_full["0.99"].items():
        torch.testing.assert_close(ema_resumed["0.99"][key], value, rtol=0, atol=0)


def test_epoch_permutation_depends_only_on_seed_and_epoch():
    a, b = EpochPermutation(10, seed=3), EpochPermutation(10, seed=3)
    torch.manual_seed(0)
    first = list(a)
    torch.manual_seed(1)
    assert list(b) == first and sorted(first) == list(range(10))
    b.epoch = 1
    assert list(b) != first
    b.epoch, b.start = 0, 4
    assert list(b) == first[4:]


def test_loader_state_counts_trained_batches_and_resumes_the_order():
    data = torch.utils.data.TensorDataset(torch.arange(20))
    loader = ResumableDataLoader(data, batch_size=4, seed=0)
    seen = [b[0].tolist() for b in loader]  # one full epoch
    assert loader.state_dict() == {"epoch": 1, "batches": 0}
    it = iter(loader)
    epoch1 = [next(it)[0].tolist() for _ in range(3)]
    loader.trained = 2  # the trainer has trained two of the three fetched batches
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 2}
    fresh = ResumableDataLoader(data, batch_size=4, seed=0)
    fresh.load_state_dict(state)
    rest = [b[0].tolist() for b in fresh]
    assert rest[0] == epoch1[2] and len(rest) == 3 and seen != epoch1 + rest[1:]
