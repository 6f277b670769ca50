"""Progressive distillation (diffusion.sampling.distillation, diffusion.training.distill).

On the analytic Gaussian teacher (data N(μ, s²), the Bayes-optimal denoiser) every DDIM step
is affine in x̃, so two teacher steps are an affine map that a student whose output is affine
in x̃ at each of its levels can represent exactly: the target identity is checked to rounding,
and a distillation run on such a student must reach it within a stated tolerance. Then the
entry point end to end on a tiny trained checkpoint: rounds, resume, refusal of a foreign run
folder, and sample.py sampler=student.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import OmegaConf

from diffusion import GaussianDiffusion, get_named_beta_schedule
from diffusion.process.analytic import GaussianDataDenoiser
from diffusion.sampling import EulerAncestralSampler
from diffusion.sampling.distillation import (
    ddim_step,
    nested_grids,
    student_target,
    truncated_snr_weight,
)
from diffusion.sampling.sigmas import Denoiser, NoiseLevels
from diffusion.utils.errors import ConfigError

from conftest import compose_config

T = 1000
MU, S = 0.2, 0.3
F64 = torch.float64
DIFFUSION = GaussianDiffusion(betas=get_named_beta_schedule("cosine", T), model_mean_type="epsilon",
                              model_var_type="fixed_small", loss_type="mse")
TEACHER = Denoiser(DIFFUSION, GaussianDataDenoiser(DIFFUSION, MU, S), clip_denoised=False)


def teacher_two_steps(x, sigma, sigma_mid, sigma_next):
    x_mid = ddim_step(x, TEACHER(x, sigma), sigma, sigma_mid)
    return ddim_step(x_mid, TEACHER(x_mid, sigma_mid), sigma_mid, sigma_next)


def test_nested_grids_and_their_refusal():
    for schedule in ("karras", "logsnr"):
        for steps in (1, 2, 4, 8):
            student, teacher = nested_grids(DIFFUSION, steps, schedule, sigma_max=80.0)
            assert student.shape == (steps + 1,) and teacher.shape == (2 * steps + 1,)
            assert student[-1] == teacher[-1] == 0 and student[0] == teacher[0] == 80.0
            np.testing.assert_allclose(teacher[0:2 * steps:2], student[:steps], rtol=1e-12)
    with pytest.raises(ValueError, match="not every other level.*schedule=karras or logsnr"):
        nested_grids(DIFFUSION, 4, "linspace")
    assert truncated_snr_weight(0.5) == 4.0 and truncated_snr_weight(3.0) == 1.0


@pytest.mark.parametrize("sigma,sigma_mid,sigma_next", [(80.0, 9.0, 1.0), (2.0, 0.7, 0.1), (0.5, 0.05, 0.0)])
def test_one_student_step_with_the_target_is_two_teacher_steps(sigma, sigma_mid, sigma_next):
    """D_s (Salimans & Ho 2022, Alg. 2 in VE coordinates) makes DDIM's one step land where the
    teacher's two land, to rounding, and at σ' = 0 it is the teacher's two-step output."""
    x = torch.randn(512, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * math.sqrt(1 + sigma**2)
    target = student_target(TEACHER, x, sigma, sigma_mid, sigma_next)
    torch.testing.assert_close(ddim_step(x, target, sigma, sigma_next),
                               teacher_two_steps(x, sigma, sigma_mid, sigma_next), rtol=1e-12, atol=1e-12)


class AffineEps(torch.nn.Module):
    """ε̂ = a_j x + b_j at the j-th of the given timesteps: D = x̃ − σ ε̂ is then any affine map
    of x̃ at each level, which is what the Gaussian teacher's two steps are."""

    def __init__(self, timesteps):
        super().__init__()
        self.register_buffer("timesteps", torch.tensor(timesteps, dtype=F64))
        self.a = torch.nn.Parameter(torch.zeros(len(timesteps), dtype=F64))
        self.b = torch.nn.Parameter(torch.zeros(len(timesteps), dtype=F64))

    def forward(self, x, t, **kwargs):
        j = (t[:, None] - self.timesteps[None, :]).abs().argmin(dim=1)
        return self.a[j].view(-1, 1, 1, 1) * x + self.b[j].view(-1, 1, 1, 1)


def test_distilling_the_analytic_teacher_gives_a_student_whose_step_is_two_teacher_steps():
    """4 student levels (Karras from σ = 80) trained with the module's loss (truncated-SNR
    weight, one level per batch) on N(μ, s²) data: afterwards each of its single DDIM steps
    matches the teacher's two steps, and the 4-step student's samples are the 8-step
    teacher's, to 1e-8 RMS (measured: 5e-13 to 5e-12; the student is affine, so exact)."""
    from diffusion.training.distill import ProgressiveDistillation  # noqa: PLC0415

    steps = 4
    student_sigmas, teacher_sigmas = nested_grids(DIFFUSION, steps, "karras", sigma_max=80.0)
    levels = NoiseLevels(DIFFUSION)
    student_net = AffineEps([levels.sigma_to_t(float(s)) for s in student_sigmas[:-1]])
    module = ProgressiveDistillation(student_net, GaussianDataDenoiser(DIFFUSION, MU, S), DIFFUSION, steps=steps,
                                     schedule="karras", rho=7.0, sigma_max=80.0, sigma_min=None, lr=0.05,
                                     num_classes=None, clip=False)
    optimizer = torch.optim.Adam(student_net.parameters(), lr=0.05)
    iterations = 1200  # annealed to 0: the ε-student's D = x̃ − σ ε̂ needs ε̂ to 1e-5 at σ = 80
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations)
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    for iteration in range(iterations):
        x_start = MU + S * torch.randn(256, 1, 2, 2, generator=generator, dtype=F64)
        optimizer.zero_grad()
        module.distillation_loss(x_start, None, iteration % steps).backward()
        optimizer.step()
        schedule.step()

    student = Denoiser(DIFFUSION, student_net, clip_denoised=False)
    x0 = MU + S * torch.randn(4096, 1, 2, 2, generator=generator, dtype=F64)
    for i in range(steps):
        sigma, sigma_next, sigma_mid = (float(student_sigmas[i]), float(student_sigmas[i + 1]),
                                        float(teacher_sigmas[2 * i + 1]))
        x = x0 + sigma * torch.randn(x0.shape, generator=generator, dtype=F64)
        with torch.no_grad():
            one = ddim_step(x, student(x, sigma), sigma, sigma_next)
        two = teacher_two_steps(x, sigma, sigma_mid, sigma_next)
        assert float((one - two).pow(2).mean().sqrt()) < 1e-8, (i, sigma)
    noise = torch.randn(4096, 1, 2, 2, generator=generator, dtype=F64)
    with torch.no_grad():
        distilled = EulerAncestralSampler(steps=steps, schedule="karras", sigma_max=80.0, eta=0.0)(
            DIFFUSION, student_net, noise=noise, clip_denoised=False)
        teacher = EulerAncestralSampler(steps=2 * steps, schedule="karras", sigma_max=80.0, eta=0.0)(
            DIFFUSION, GaussianDataDenoiser(DIFFUSION, MU, S), noise=noise, clip_denoised=False)
    assert float((distilled - teacher).pow(2).mean().sqrt()) < 1e-8


# ------------------------------------------------------------------ the entry point
def distill_cfg(tmp_path, ckpt, *overrides):
    return compose_config("distill", [f"ckpt={ckpt}", "start_steps=4", "student_steps=2", "steps_per_round=3",
                                      "checkpoint_every=2", "batch_size=16", "progress=false", *overrides],
                          tmp_path / "distilled")


@pytest.mark.slow
def test_distill_rounds_resume_refuse_and_sample(tmp_path, tiny_ckpt, monkeypatch):
    from diffusion.checkpoint import load_checkpoint  # noqa: PLC0415
    from diffusion.jobs.sample import sample  # noqa: PLC0415
    from diffusion.training.distill import distill  # noqa: PLC0415

    monkeypatch.chdir(tmp_path)
    final = distill(distill_cfg(tmp_path, tiny_ckpt))
    out = tmp_path / "distilled"
    assert sorted(os.listdir(out)) == ["config.yaml", "round_0002", "round_0004", "student.ckpt"]
    loaded = load_checkpoint(final)
    assert loaded.distilled["steps"] == 2 and loaded.distilled["sampler"]["steps"] == 2
    weights = {k: v.clone() for k, v in loaded.model.state_dict().items()}

    # a rerun with the same settings trains nothing: the rounds are done
    os.utime(out / "round_0002" / "student.ckpt", (1, 1))
    before = os.stat(out / "round_0002" / "student.ckpt").st_mtime
    distill(distill_cfg(tmp_path, tiny_ckpt))
    assert os.stat(out / "round_0002" / "student.ckpt").st_mtime == before
    for key, value in load_checkpoint(final).model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)

    # other settings in the same folder: refused before anything is written
    config = (out / "config.yaml").read_text()
    with pytest.raises(Exception, match="other settings.*new output_dir"):
        distill(distill_cfg(tmp_path, tiny_ckpt, "lr=3e-4"))
    assert (out / "config.yaml").read_text() == config

    # sample.py with the student's own sampler: 2 model calls per batch
    calls = []
    original = EulerAncestralSampler._solve

    def counting(self, denoise, x, sigmas, generator, progress):
        calls.append(self.steps)
        return original(self, denoise, x, sigmas, generator, progress)

    monkeypatch.setattr(EulerAncestralSampler, "_solve", counting)
    cfg = compose_config("sample", [f"ckpt={final}", "sampler=student", "num_samples=4", "batch_size=4",
                                    "progress=false"], tmp_path / "samples")
    result = sample(cfg)
    assert result["num_images"] == 4 and calls == [2]
    assert OmegaConf.select(cfg, "sampler.steps") == 2  # the shard key saw the concrete sampler
    cfg = compose_config("sample", [f"ckpt={final}", "sampler=student", "sampler.steps=4", "num_samples=4",
                                    "progress=false"], tmp_path / "samples4")
    with pytest.raises(ConfigError, match="sampler.steps=4: .* progressive student, distilled for its 2 steps only"):
        sample(cfg)  # a progressive student learned its own grid's steps only

    # consistency distillation: one round, a one-step student with its own sampler
    from diffusion.sampling import ConsistencySampler  # noqa: PLC0415

    consistency = distill(compose_config("distill", [
        f"ckpt={tiny_ckpt}", "method=consistency", "student_steps=1", "consistency_levels=6", "steps_per_round=3",
        "batch_size=16", "progress=false"], tmp_path / "consistency"))
    assert sorted(os.listdir(tmp_path / "consistency")) == ["config.yaml", "consistency", "student.ckpt"]
    student = load_checkpoint(consistency)
    assert student.distilled["method"] == "consistency"
    from diffusion.checkpoint import read_checkpoint  # noqa: PLC0415

    keys = read_checkpoint(consistency)["state_dict"]
    assert keys and all(k.startswith("model.") for k in keys)  # the target network stays out of the layout
    cfg = compose_config("sample", [f"ckpt={consistency}", "sampler=student", "num_samples=4", "batch_size=4",
                                    "progress=false"], tmp_path / "samples_cd")
    assert sample(cfg)["num_images"] == 4
    assert isinstance(hydra_instantiate(cfg.sampler), ConsistencySampler) and cfg.sampler.steps == 1
    # the same student in three calls (Song et al.'s multistep Alg. 1), and a bad count refused
    cfg = compose_config("sample", [f"ckpt={consistency}", "sampler=student", "sampler.steps=3", "num_samples=4",
                                    "batch_size=4", "progress=false"], tmp_path / "samples_cd3")
    assert sample(cfg)["nfe"] == 3 and cfg.sampler.steps == 3
    cfg = compose_config("sample", [f"ckpt={consistency}", "sampler=student", "sampler.steps=0", "num_samples=4",
                                    "progress=false"], tmp_path / "samples_cd0")
    with pytest.raises(ConfigError, match="sampler.steps"):
        sample(cfg)


@pytest.mark.slow
def test_a_resumed_round_keeps_the_rows_logged_before_it_was_stopped(tmp_path, tiny_ckpt, monkeypatch):
    """A round stopped after its checkpoint at step 50 resumes there and ends with the rows of
    both parts, each step once (Lightning's own CSVLogger deleted the file on reuse)."""
    import csv  # noqa: PLC0415

    from diffusion.training.distill import ProgressiveDistillation, distill  # noqa: PLC0415

    monkeypatch.chdir(tmp_path)
    original, stopped = ProgressiveDistillation.training_step, []

    def stops_once_at_step_60(self, batch, batch_idx):
        if self.global_step == 60 and not stopped:
            stopped.append(self.global_step)
            raise RuntimeError("stopped at step 60")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(ProgressiveDistillation, "training_step", stops_once_at_step_60)
    cfg = ["start_steps=2", "student_steps=1", "steps_per_round=100", "checkpoint_every=50"]
    with pytest.raises(RuntimeError, match="stopped at step 60"):
        distill(distill_cfg(tmp_path, tiny_ckpt, *cfg))
    (metrics,) = (tmp_path / "distilled").glob("round_*/csv/metrics.csv")
    assert [int(row["step"]) for row in csv.DictReader(open(metrics))] == [49]
    distill(distill_cfg(tmp_path, tiny_ckpt, *cfg))
    rows = list(csv.DictReader(open(metrics)))
    assert [int(row["step"]) for row in rows] == [49, 99] and all(row["train/loss"] for row in rows)


def test_distill_settings_are_checked(tmp_path):
    from diffusion.training.distill import check_settings, round_steps  # noqa: PLC0415

    cfg = compose_config("distill", ["ckpt=unused"], tmp_path)
    assert round_steps(cfg) == [32, 16, 8, 4]
    for overrides, message in [
        (["start_steps=12", "student_steps=4"], "start_steps must be student_steps times a power of two"),
        (["start_steps=4", "student_steps=4"], "start_steps must be student_steps times a power of two"),
    ]:
        with pytest.raises(ConfigError, match=message):
            round_steps(compose_config("distill", ["ckpt=unused", *overrides], tmp_path))
    for overrides, message in [(["method=adversarial"], "method='adversarial': choose method=progressive or"),
                               (["method=consistency", "target_decay=1"], "target_decay=1 must be in"),
                               (["steps_per_round=0"], "steps_per_round=0 must be a positive integer"),
                               (["lr=0"], "lr=0"), (["ema_decay=1.0"], "ema_decay=1.0 must be in")]:
        with pytest.raises(ConfigError, match=message):
            check_settings(compose_config("distill", ["ckpt=unused", *overrides], tmp_path))


def test_sampler_student_needs_a_student(tmp_path, tiny_ckpt, monkeypatch):
    from diffusion.jobs.sample import sample  # noqa: PLC0415

    monkeypatch.chdir(tmp_path)
    cfg = compose_config("sample", [f"ckpt={tiny_ckpt}", "sampler=student", "num_samples=2", "progress=false"],
                         tmp_path / "samples")
    with pytest.raises(ConfigError, match="sampler=student: .* names no sampler .*sampler=ddim50"):
        sample(cfg)
    assert not (tmp_path / "samples").exists() or not any((tmp_path / "samples").iterdir())


# ------------------------------------------------------------ consistency distillation
def test_consistency_function_keeps_the_boundary_and_levels_are_karras():
    from diffusion.sampling.distillation import (
        consistency_function,
        consistency_levels,
        consistency_scalings,
    )

    levels = consistency_levels(DIFFUSION, 18, sigma_max=80.0)
    sigma_min = NoiseLevels(DIFFUSION).sigma_min
    assert levels.shape == (18,) and levels[0] == sigma_min and levels[-1] == 80.0 and (np.diff(levels) > 0).all()
    ramp = (levels ** (1 / 7) - sigma_min ** (1 / 7)) / (80.0 ** (1 / 7) - sigma_min ** (1 / 7))
    np.testing.assert_allclose(ramp, np.linspace(0, 1, 18), atol=1e-12)  # EDM eq. 5
    x = torch.randn(8, 1, 2, 2, dtype=F64)
    assert consistency_scalings(sigma_min, sigma_min) == (1.0, 0.0)
    torch.testing.assert_close(consistency_function(lambda *a: 1 / 0, x, sigma_min, sigma_min), x)  # D unused
    c_skip, c_out = consistency_scalings(80.0, sigma_min)
    assert c_skip < 1e-4 and c_out > 0.99  # far from σ_min, f is the denoiser's x̂_0
    with pytest.raises(ValueError, match="num_levels=1 must be an integer ≥ 2"):
        consistency_levels(DIFFUSION, 1)


def test_consistency_loss_vanishes_exactly_at_the_teachers_trajectory_map():
    """The fixed point of consistency distillation with a DDIM teacher on N levels is
    f(x̃, σ_k) = the end at σ_min of the teacher's DDIM steps down the levels from (x̃, σ_k).
    For Gaussian data that map is affine at each level, and an affine ε-student can be set to
    it: then the module's loss is zero at every level (to 1e-24, rounding) and the one-step
    sampler reproduces the 17-step trajectory end (to 1e-12), while a student whose ε̂ is off
    by 1e-3 has a loss > 1e-8 at some level. Training from a zero student lowers the loss."""
    from diffusion.sampling import ConsistencySampler  # noqa: PLC0415
    from diffusion.sampling.distillation import consistency_scalings  # noqa: PLC0415
    from diffusion.training.distill import ConsistencyDistillation  # noqa: PLC0415

    levels = NoiseLevels(DIFFUSION)
    module = ConsistencyDistillation(AffineEps([0.0]), GaussianDataDenoiser(DIFFUSION, MU, S), DIFFUSION, steps=1,
                                     num_levels=18, rho=7.0, sigma_max=80.0, target_decay=0.0, lr=0.0,
                                     num_classes=None, clip=False)
    sigmas = [float(x) for x in module.levels]  # ascending, sigmas[0] = σ_min

    def trajectory_end(x, k):  # the teacher's DDIM steps from sigmas[k] down to σ_min
        for j in range(k, 0, -1):
            x = ddim_step(x, TEACHER(x, sigmas[j]), sigmas[j], sigmas[j - 1])
        return x

    student = AffineEps([levels.sigma_to_t(s) for s in sigmas[1:]])
    with torch.no_grad():
        for k in range(1, len(sigmas)):  # f = A x̃ + B; D = x̃ − σ ε̂ with ε̂ = a c_in x̃ + b
            zero, one = (trajectory_end(torch.full((1, 1, 1, 1), v, dtype=F64), k).item() for v in (0.0, 1.0))
            slope, shift = one - zero, zero
            sigma, c_in = sigmas[k], 1 / math.sqrt(1 + sigmas[k] ** 2)
            c_skip, c_out = consistency_scalings(sigma, sigmas[0])
            student.a[k - 1] = (c_skip + c_out - slope) / (c_out * sigma * c_in)
            student.b[k - 1] = -shift / (c_out * sigma)
    module.model, module.target = student, student
    x_start = MU + S * torch.randn(512, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    with torch.no_grad():
        losses = [float(module.distillation_loss(x_start, None, n)) for n in range(module.num_levels())]
        assert max(losses) < 1e-24, losses
        noise = torch.randn(4096, 1, 2, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
        one_step = ConsistencySampler(steps=1, sigma_max=80.0)(DIFFUSION, student, noise=noise, clip_denoised=False)
        torch.testing.assert_close(one_step, trajectory_end(noise * math.sqrt(1 + 80.0**2), 17), rtol=0, atol=1e-12)
        student.b.add_(1e-3)  # off the map
        assert max(float(module.distillation_loss(x_start, None, n)) for n in range(module.num_levels())) > 1e-8

    # from a zero ε̂ (D = x̃), the module's loss and Adam lower the total loss
    teacher_like = AffineEps([levels.sigma_to_t(s) for s in sigmas[1:]])
    module.model = module.target = teacher_like
    optimizer = torch.optim.Adam(teacher_like.parameters(), lr=0.01)
    torch.manual_seed(5)

    def total_loss():
        with torch.no_grad():
            return sum(float(module.distillation_loss(x_start, None, n)) for n in range(module.num_levels()))

    before = total_loss()
    for iteration in range(300):
        optimizer.zero_grad()
        module.distillation_loss(x_start, None, iteration % module.num_levels()).backward()
        optimizer.step()
    assert total_loss() < before / 2
