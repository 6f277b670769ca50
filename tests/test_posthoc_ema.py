"""Post-hoc EMA (EDM2, arXiv 2312.02696, sec. 3 and App. C): the σ_rel <-> γ conversion, the
profiles' inner products, the reconstruction of an untracked profile from snapshots, exact
resume of the snapshots, and sample.py / evaluate.py with ``ema_std``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import integrate
from torch import nn

from diffusion.checkpoint import (
    CheckpointError,
    posthoc_ema_state,
    read_snapshot,
    save_snapshot,
    snapshot_path,
    snapshot_steps,
)
from diffusion.jobs import sample as sample_job
from diffusion.jobs.sample import sample
from diffusion.jobs.shards import ShardsMismatchError
from diffusion.process.posthoc_ema import (
    STD_MAX,
    gamma_from_std,
    power_beta,
    profile_inner_products,
    solve_coefficients,
    std_from_gamma,
)
from diffusion.training.config_checks import check_train_config
from diffusion.training.posthoc_ema import PostHocEMA
from diffusion.training.preflight import check_posthoc_ema_folder
from diffusion.training.run import train
from diffusion.utils.errors import ConfigError

from conftest import REPO, train_checkpoint
from test_job_faults import interrupted_run
from test_train import TINY_RUN

GAMMAS = [0.5, 2.0, 6.94, 16.97, 50.0]


# ------------------------------------------------------------------ σ_rel <-> γ, closed forms
def profile(gamma: float, t: float = 1.0):
    """The power-function profile p_γ,t(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t] (EDM2 sec. 3.1)."""
    return lambda tau: (gamma + 1) * tau**gamma / t ** (gamma + 1)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_std_of_the_profile_by_numerical_integration(gamma):
    """σ_rel from the closed form equals the std of the profile integrated numerically (t = 1),
    and the cubic's root takes it back to γ."""
    p = profile(gamma)
    moments = [integrate.quad(lambda tau, k=k: tau**k * p(tau), 0, 1, epsabs=1e-14, epsrel=1e-13)[0]
               for k in range(3)]
    assert moments[0] == pytest.approx(1, abs=1e-12)
    numeric = np.sqrt(moments[2] - moments[1] ** 2)
    assert std_from_gamma(gamma) == pytest.approx(numeric, rel=1e-10)
    assert gamma_from_std(std_from_gamma(gamma)) == pytest.approx(gamma, rel=1e-9)


def test_the_papers_pair_and_the_domain():
    """EDM2 tracks σ_rel = 0.05 and 0.10, which it quotes as γ = 16.97 and 6.94."""
    assert gamma_from_std(0.05) == pytest.approx(16.97, abs=0.005)
    assert gamma_from_std(0.10) == pytest.approx(6.94, abs=0.005)
    assert STD_MAX == pytest.approx(12**-0.5) and gamma_from_std(STD_MAX) == pytest.approx(0, abs=1e-7)
    for bad in (0, -0.1, STD_MAX + 1e-3, 1.0, True, "0.05"):
        with pytest.raises(ValueError, match="σ_rel of a power-function EMA"):
            gamma_from_std(bad)


@pytest.mark.parametrize("std", [0.05, 0.10, 0.2])
def test_the_discrete_update_realises_the_profile(std):
    """β_t = (1 - 1/t)^(γ+1), run for T steps: step τ's weight (1 - β_τ) Π_{s>τ} β_s, summed in
    log space here, is the profile integrated over (τ-1, τ], so the weights sum to 1 and their
    std over T is σ_rel up to the O(1/T) of the binning."""
    gamma, T = gamma_from_std(std), 20_000
    betas = np.array([power_beta(t, gamma) for t in range(1, T + 1)])
    log_after = np.concatenate([np.cumsum(np.log(betas[:0:-1]))[::-1], [0.0]])  # Σ_{s>τ} log β_s
    weights = (1 - betas) * np.exp(log_after)
    tau = np.arange(1, T + 1, dtype=np.float64)
    np.testing.assert_allclose(weights, (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / T ** (gamma + 1),
                               rtol=1e-9, atol=1e-15)
    assert weights.sum() == pytest.approx(1, abs=1e-12)
    mean = (weights * tau).sum()
    assert np.sqrt((weights * (tau - mean) ** 2).sum()) / T == pytest.approx(std, rel=1e-3)


@pytest.mark.parametrize("ta, ga, tb, gb", [(300, 6.94, 1000, 16.97), (1000, 6.94, 300, 16.97),
                                            (700, 2.0, 700, 50.0), (5, 0.5, 9, 6.94)])
def test_inner_products_by_numerical_integration(ta, ga, tb, gb):
    """⟨p_a, p_b⟩ in closed form (EDM2 App. C.3) against quadrature of the product."""
    pa, pb = profile(ga, ta), profile(gb, tb)
    numeric = integrate.quad(lambda tau: pa(tau) * pb(tau), 0, min(ta, tb), epsabs=0, epsrel=1e-12)[0]
    assert profile_inner_products([ta], [ga], [tb], [gb])[0, 0] == pytest.approx(numeric, rel=1e-9)


def test_a_tracked_profile_is_its_own_reconstruction():
    """A target that is one of the snapshots' profiles gets weight 1 on that snapshot."""
    steps = [100, 100, 200, 200, 300, 300]
    gammas = [16.97, 6.94] * 3
    x = solve_coefficients(steps, gammas, target_gamma=6.94)
    np.testing.assert_allclose(x, [0, 0, 0, 0, 0, 1], atol=1e-6)


# ------------------------------------------------------------------ reconstruction (done-when)
def stub_trainer(step: int = 0):
    """What the callback reads of a Trainer, without Lightning's loops."""
    return SimpleNamespace(global_step=step, is_global_zero=True, checkpoint_callback=None, default_root_dir=".")


def holder(size: int) -> nn.Module:
    """A LightningModule stand-in: ``.model`` holds a float parameter and an integer buffer."""
    owner = nn.Module()
    owner.model = nn.Module()
    owner.model.weight = nn.Parameter(torch.zeros(size))
    owner.model.register_buffer("count", torch.zeros((), dtype=torch.long))
    return owner


def simulate(callbacks: list[PostHocEMA], trajectory: torch.Tensor) -> None:
    """Drive the callbacks' hooks over the steps of ``trajectory`` (T, D): the weights after
    optimizer step t are trajectory[t - 1]."""
    owner, trainer = holder(trajectory.shape[1]), stub_trainer()
    for callback in callbacks:
        callback.on_fit_start(trainer, owner)
        callback.on_train_start(trainer, owner)
    with torch.no_grad():
        for t, weights in enumerate(trajectory, start=1):
            owner.model.weight.copy_(weights)
            owner.model.count.fill_(t)
            trainer.global_step = t
            for callback in callbacks:
                callback.on_train_batch_end(trainer, owner, None, None, t - 1)


def random_walk(steps: int, size: int, seed: int = 0) -> torch.Tensor:
    """Weights that wander like SGD's: a random walk with a drift, (steps, size) float32."""
    generator = np.random.default_rng(seed)
    walk = np.cumsum(generator.standard_normal((steps, size)), axis=0) / np.sqrt(steps)
    drift = np.linspace(0, 1, steps)[:, None] * generator.standard_normal(size)
    return torch.from_numpy(walk + drift).float()


def test_reconstruction_matches_a_tracked_third_profile(tmp_path):
    """The key test. Train (a random walk of 4000 weights, 1200 steps) while tracking
    σ_rel = 0.05 and 0.10 with snapshots every 100 steps, and, separately, σ_rel = 0.07
    (γ = 10.7). Rebuilt from the 24 snapshots, the σ_rel = 0.07 average matches the tracked
    one to within 1% of the distance between the two tracked averages (measured: 0.2%), and
    the rebuilt per-step weights are within 0.01 of the profile's in L1 (measured: 0.0063),
    which bounds the error for any weights by 0.01 times their largest magnitude."""
    T, every, target = 1200, 100, 0.07
    tracked = PostHocEMA(stds=(0.05, 0.10), snapshot_every=every, dirpath=str(tmp_path / "phema"))
    third = PostHocEMA(stds=(target,), snapshot_every=10 * T, dirpath=str(tmp_path / "third"))
    simulate([tracked, third], random_walk(T, 4000))
    assert snapshot_steps(str(tmp_path / "phema")) == list(range(every, T + 1, every))
    assert not os.path.exists(tmp_path / "third")

    state, step = posthoc_ema_state(str(tmp_path / "phema"), target, run_id=tracked.run_id)
    assert step == T and state["count"].item() == T  # integer buffers: the last snapshot's
    rebuilt, truth = state["weight"].double(), third.averages[target][0].double()
    narrow, wide = (avg[0].double() for avg in tracked.averages.values())
    assert (rebuilt - truth).norm() <= 0.01 * (narrow - wide).norm()

    steps = [s for s in range(every, T + 1, every) for _ in range(2)]
    gammas = list(tracked.gammas) * (T // every)
    x = solve_coefficients(steps, gammas, gamma_from_std(target))
    tau = np.arange(1, T + 1, dtype=np.float64)

    def step_weights(t, gamma):  # the discrete EMA's weight of each step τ at step t
        return np.where(tau <= t, (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / t ** (gamma + 1), 0)

    combined = sum(c * step_weights(t, g) for c, t, g in zip(x, steps, gammas, strict=True))
    assert np.abs(combined - step_weights(T, gamma_from_std(target))).sum() < 0.01
    # A tracked width comes back as itself.
    state, _ = posthoc_ema_state(str(tmp_path / "phema"), 0.05, run_id=tracked.run_id)
    torch.testing.assert_close(state["weight"], tracked.averages[0.05][0], rtol=1e-5, atol=1e-5)


def test_snapshots_of_another_run_are_never_replaced(tmp_path):
    """A new run meeting a folder of another run's snapshots stops before its first step, and
    a snapshot of a step that exists is replaced only by the run that wrote it."""
    folder = str(tmp_path / "phema")
    first = PostHocEMA(snapshot_every=2, dirpath=folder)
    simulate([first], random_walk(4, 3))
    before = open(snapshot_path(folder, 2), "rb").read()
    second = PostHocEMA(snapshot_every=2, dirpath=folder)
    second.on_fit_start(stub_trainer(), holder(3))
    with pytest.raises(CheckpointError, match=r"phema-0000002.pt is a post-hoc EMA snapshot of another run"):
        second.on_train_start(stub_trainer(), holder(3))
    with pytest.raises(CheckpointError, match="another run"):
        save_snapshot(folder, 2, second.run_id, second.profiles())
    assert open(snapshot_path(folder, 2), "rb").read() == before
    save_snapshot(folder, 2, first.run_id, first.profiles())  # the same run writes it again
    assert read_snapshot(snapshot_path(folder, 2))["run_id"] == first.run_id


def test_a_requeued_job_with_nothing_to_resume_sets_the_orphans_aside(tmp_path):
    """ckpt_path=last_or_new without a checkpoint: the killed run's snapshots cannot be
    continued; preflight moves them aside (kept, beside) instead of refusing the new run.
    A plain new run in that folder is refused instead."""
    folder = tmp_path / "checkpoints" / "phema"
    simulate([PostHocEMA(snapshot_every=2, dirpath=str(folder))], random_walk(4, 3))
    cfg = OmegaConf.create({"output_dir": str(tmp_path), "ckpt_path": None,
                            "callbacks": {"posthoc_ema": {"_target_": "diffusion.training.posthoc_ema.PostHocEMA"}}})
    with pytest.raises(CheckpointError, match="another run"):
        check_posthoc_ema_folder(cfg, None)
    cfg.ckpt_path = "last_or_new"
    check_posthoc_ema_folder(cfg, None)
    assert not folder.exists() and snapshot_steps(str(tmp_path / "checkpoints" / "phema-superseded-1")) == [2, 4]


def test_resume_needs_the_same_profiles_and_their_averages():
    saved = PostHocEMA(stds=(0.05, 0.10)).state_dict()
    with pytest.raises(ValueError, match=r"checkpoint tracks stds=\[0.05, 0.1\], this run stds=\[0.05, 0.2\]"):
        PostHocEMA(stds=(0.05, 0.2)).load_state_dict(saved)
    with pytest.raises(ValueError, match="the run is at step 7 but its averages hold 0 steps"):
        PostHocEMA().on_train_start(stub_trainer(7), holder(3))
    for stds in ([0.5], [], [0.05, 0.05], "0.05"):
        with pytest.raises(ValueError, match="stds="):
            PostHocEMA(stds=stds)


def test_config_checks(compose_cfg):
    """Bad settings are one line naming the key, the value and the fix, before anything runs."""
    for overrides, message in [
        (["callbacks.posthoc_ema.stds=[0.05,0.4]"], r"callbacks.posthoc_ema.stds=\[0.05,0.4\] must be a list"),
        (["callbacks.posthoc_ema.snapshot_every=0"], "callbacks.posthoc_ema.snapshot_every=0 must be an integer >= 1"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_train_config(compose_cfg("train", overrides))
    assert "posthoc_ema" not in compose_cfg("train", ["experiment=cifar_linear_ddpm"]).callbacks  # off elsewhere
    check_train_config(compose_cfg("train", []))  # the quickstart's own settings pass


# ------------------------------------------------------------------ Lightning: exact resume
class StopAt(L.Callback):
    """Stops the fit after optimizer step ``step``, as a pre-emption would (with a checkpoint there)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


RESUME_RUN = [*TINY_RUN, "trainer.max_steps=6", "trainer.limit_val_batches=0", "test_after_fit=false",
              "~callbacks.sample_grid", "callbacks.posthoc_ema.snapshot_every=2",
              "callbacks.model_checkpoint.every_n_train_steps=3", "callbacks.model_checkpoint.save_top_k=-1"]


def test_snapshots_survive_an_interruption(compose_cfg, tmp_path):
    """A run stopped at step 3 and resumed from its checkpoint writes the snapshots of steps
    2, 4 and 6 that the uninterrupted run writes, bit for bit, keeps the one written before
    the stop, and keeps its run id; a new run in its folder is refused before it writes."""
    full, parted = tmp_path / "full", tmp_path / "parted"
    train(compose_cfg("train", RESUME_RUN, output_dir=full))
    train(compose_cfg("train", [*RESUME_RUN, "+callbacks.stop._target_=test_posthoc_ema.StopAt",
                                "+callbacks.stop.step=3"], output_dir=parted))
    folder = parted / "checkpoints" / "phema"
    assert snapshot_steps(str(folder)) == [2]
    kept = os.stat(folder / "phema-0000002.pt")
    resume = parted / "checkpoints" / "step0000003.ckpt"
    train(compose_cfg("train", [*RESUME_RUN, f"ckpt_path={resume}"], output_dir=parted))

    assert snapshot_steps(str(folder)) == snapshot_steps(str(full / "checkpoints" / "phema")) == [2, 4, 6]
    after = os.stat(folder / "phema-0000002.pt")
    assert (after.st_ino, after.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
    run_ids = set()
    for step in (2, 4, 6):
        a, b = (read_snapshot(snapshot_path(str(run / "checkpoints" / "phema"), step)) for run in (full, parted))
        run_ids.add(b["run_id"])
        assert a["step"] == b["step"] == step and len(a["profiles"]) == len(b["profiles"]) == 2
        for pa, pb in zip(a["profiles"], b["profiles"], strict=True):
            assert (pa["std"], pa["gamma"]) == (pb["std"], pb["gamma"])
            for name, value in pa["state_dict"].items():
                torch.testing.assert_close(pb["state_dict"][name], value, rtol=0, atol=0)
    assert len(run_ids) == 1
    assert torch.load(parted / "checkpoints" / "last.ckpt", weights_only=False)["phema"]["run_id"] in run_ids

    with pytest.raises(CheckpointError, match="another run .* this is a new run"):
        train(compose_cfg("train", RESUME_RUN, output_dir=parted))


# ------------------------------------------------------------------ sample.py and evaluate.py
@pytest.fixture(scope="module")
def phema_ckpt(tmp_path_factory):
    """A 4-step run of a tiny UNet (T = 50) with snapshots at steps 2 and 4."""
    return train_checkpoint(tmp_path_factory.mktemp("phema_run"), [
        *TINY_RUN, "trainer.max_steps=4", "test_after_fit=false", "trainer.limit_val_batches=0",
        "~callbacks.sample_grid", "callbacks.posthoc_ema.snapshot_every=2"])


def sample_cfg(compose_cfg, folder, *overrides):
    return compose_cfg("sample", ["progress=false", "sampler=ddim10", "num_samples=4", "batch_size=2",
                                  *overrides], output_dir=folder)


def test_sample_with_ema_std(compose_cfg, phema_ckpt, tmp_path):
    """ema_std=0.07 samples with the weights rebuilt from the run's snapshots."""
    cfg = sample_cfg(compose_cfg, tmp_path / "samples", f"ckpt={phema_ckpt}", "ema_std=0.07")
    out = sample(cfg)
    assert out["weights"] == "phema_0.07@4" and np.load(out["npz"])["arr_0"].shape == (4, 8, 8, 1)
    loaded = sample_job.load_chosen_weights(cfg)
    run_id = torch.load(phema_ckpt, weights_only=False)["phema"]["run_id"]
    expected, _ = posthoc_ema_state(os.path.join(os.path.dirname(phema_ckpt), "phema"), 0.07, run_id=run_id)
    for name, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)


def test_ema_std_errors_and_shards(compose_cfg, phema_ckpt, tmp_path, monkeypatch):
    """No snapshots beside the checkpoint, a width no profile has, or ema_std with weights=:
    one line each, naming the value or the folder and the fix. Shards drawn with one σ_rel
    are not finished with another."""
    lonely = tmp_path / "elsewhere" / "last.ckpt"
    lonely.parent.mkdir()
    shutil.copy(phema_ckpt, lonely)
    folder = re.escape(str(lonely.parent / "phema"))
    with pytest.raises(CheckpointError, match=rf"ema_std=0.05: {folder} holds no post-hoc EMA snapshots .*"
                                              r"train with callbacks.posthoc_ema .* or leave ema_std out") as err:
        sample(sample_cfg(compose_cfg, tmp_path / "a", f"ckpt={lonely}", "ema_std=0.05"))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"ema_std=0.5 must be a σ_rel in \(0, 0.2887\]"):
        sample(sample_cfg(compose_cfg, tmp_path / "a", f"ckpt={phema_ckpt}", "ema_std=0.5"))
    with pytest.raises(ConfigError, match="ema_std=0.05 and weights=raw both choose the weights"):
        sample(sample_cfg(compose_cfg, tmp_path / "a", f"ckpt={phema_ckpt}", "ema_std=0.05", "weights=raw"))
    assert not (tmp_path / "a").exists()

    interrupted_run(sample_cfg(compose_cfg, tmp_path / "b", f"ckpt={phema_ckpt}", "ema_std=0.05"), monkeypatch)
    with pytest.raises(ShardsMismatchError, match=r"ema_std 0.05 -> 0.1"):
        sample(sample_cfg(compose_cfg, tmp_path / "b", f"ckpt={phema_ckpt}", "ema_std=0.1"))


@pytest.mark.slow
def test_evaluate_sweep_over_ema_std_reports_the_best(phema_ckpt, tmp_path):
    """The README's sweep: evaluate.py -m ... ema_std=0.05,0.1 ranks the jobs in summary.json."""
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "evaluate.py", "-m", f"ckpt={phema_ckpt}", "ema_std=0.05,0.1", "metric=nll",
         "max_batches=1", "batch_size=8", "progress=false", f"hydra.sweep.dir={sweep}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((sweep / "summary.json").read_text())["nll"]
    scores = [job["score"] for job in summary["jobs"]]
    assert len(scores) == 2 and scores == sorted(scores) and summary["best"] == summary["jobs"][0]
    assert {job["ema_std"] for job in summary["jobs"]} == {0.05, 0.1}
    assert {job["weights"] for job in summary["jobs"]} == {"phema_0.05@4", "phema_0.1@4"}
    assert "best first" in result.stdout and "ema_std=" in result.stdout
