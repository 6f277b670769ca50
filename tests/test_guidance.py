"""Classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598): the null class of the
UNet, label dropout in training, the guided model wrapper of every sampler, the sample job."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion import GaussianDiffusion, get_named_beta_schedule
from diffusion.checkpoint import LoadedCheckpoint, load_checkpoint
from diffusion.jobs import sample as sample_job
from diffusion.nets.unet import UNet
from diffusion.process.analytic import GaussianDataDenoiser
from diffusion.sampling import SAMPLERS, DDIMSampler, DDPMSampler, get_sampler
from diffusion.sampling.guidance import NULL_LABEL_KEY, ClassifierFreeGuidance, apply_guidance
from diffusion.training.module import DiffusionModule
from diffusion.training.run import build_module

from conftest import REPO, compose_config
from test_train import TINY_RUN

NUM_CLASSES = 3
NULL = NUM_CLASSES
T = 500  # every sampler preset fits (ddim250: stride 2, ddim100: stride 5)
SAMPLER_CONFIGS = REPO / "configs" / "sampler"
TINY = dict(model_channels=32, num_res_blocks=1, channel_mult=[1, 2], attention_resolutions=[],
            num_heads=2, dropout=0.0)


def process(var_type="fixed_small", num_timesteps=T, mean_type="epsilon"):
    return GaussianDiffusion(betas=get_named_beta_schedule("linear", num_timesteps),
                             model_mean_type=mean_type, model_var_type=var_type, loss_type="mse")


def tiny_unet(null_class=True, out_channels=1, seed=0) -> UNet:
    """A 8x8 one-channel UNet with random weights (so that its output depends on y)."""
    torch.manual_seed(seed)
    net = UNet(image_size=8, in_channels=1, out_channels=out_channels, num_classes=NUM_CLASSES,
               null_class=null_class, **TINY).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.2)
    return net


class LabelModel:
    """out = x·(1 + a_y) + b_y·t/T on C channels (then the same with c_y for a variance part):
    deterministic, different for every label, and it records every call."""

    def __init__(self, channels=1, learned_variance=False):
        g = torch.Generator().manual_seed(0)
        self.a, self.b, self.c = torch.randn(3, NUM_CLASSES + 1, generator=g, dtype=torch.float64)
        self.channels, self.learned_variance = channels, learned_variance
        self.calls: list[tuple[int, torch.Tensor]] = []

    def __call__(self, x, t, y):  # no **kwargs: a leaked "null_label" would be a TypeError
        self.calls.append((x.shape[0], y.clone()))
        col = lambda v: v.view(-1, 1, 1, 1).to(x.dtype)  # noqa: E731  (B,) -> (B, 1, 1, 1)
        time = col(torch.as_tensor(t, dtype=x.dtype) / T)
        mean = x * (1 + col(self.a[y])) + col(self.b[y]) * time
        if not self.learned_variance:
            return mean
        return torch.cat([mean, torch.tanh(x * col(self.c[y]))], dim=1)  # (B, 2C, H, W)


def labels(batch=6):
    return torch.arange(batch) % NUM_CLASSES


def draw(sampler, model, y, diffusion=None, null_label=NULL, batch=6, seed=0, shape=(1, 2, 2)):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    kwargs = {"y": y} if null_label is None else {"y": y, NULL_LABEL_KEY: null_label}
    return sampler(diffusion or process(), model, noise=noise, model_kwargs=kwargs, generator=g)


# -------------------------------------------------------------------------- the sampler
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_scale_one_is_conditional_and_scale_zero_unconditional(name):
    model, y = LabelModel(), labels()
    conditional = draw(get_sampler(name), model, y, null_label=None)
    assert torch.equal(draw(get_sampler(name, guidance_scale=1.0), model, y), conditional)
    unconditional = draw(get_sampler(name), model, torch.full_like(y, NULL), null_label=None)
    assert torch.equal(draw(get_sampler(name, guidance_scale=0.0), model, y), unconditional)
    assert not torch.equal(conditional, unconditional)  # the labels do matter


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_one_batched_forward_per_model_evaluation(name):
    model, y = LabelModel(), labels()
    sampler = get_sampler(name, guidance_scale=3.0)
    draw(sampler, model, y)
    assert len(model.calls) == sampler.num_function_evals(T)
    for batch, seen in model.calls:
        assert batch == 2 * len(y)
        assert torch.equal(seen, torch.cat([y, torch.full_like(y, NULL)]))  # [y, ∅]
    for scale in (1.0, 0.0):  # no doubled batch for plain (un)conditional sampling
        model = LabelModel()
        draw(get_sampler(name, guidance_scale=scale), model, y)
        assert {batch for batch, _ in model.calls} == {len(y)}


def test_guided_sampling_equals_two_separate_evaluations_with_a_unet():
    net, y = tiny_unet(), labels(2)

    def reference(x, t, y):  # Ho & Salimans eq. 6 with w' = w − 1, two separate calls
        out_c, out_u = net(x, t, y=y), net(x, t, y=torch.full_like(y, NULL))
        return out_u + 2.5 * (out_c - out_u)

    guided = draw(DDIMSampler(steps=3, guidance_scale=2.5), net, y, batch=2, shape=(1, 8, 8))
    expected = draw(DDIMSampler(steps=3), reference, y, null_label=None, batch=2, shape=(1, 8, 8))
    torch.testing.assert_close(guided, expected, rtol=1e-9, atol=1e-9)
    plain = draw(DDIMSampler(steps=3), net, y, null_label=None, batch=2, shape=(1, 8, 8))
    assert (guided - plain).abs().max() > 1e-3


def test_learned_variance_guides_the_mean_and_keeps_the_conditional_variance():
    model, y = LabelModel(learned_variance=True), labels(4)
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    t = torch.full((4,), 7)
    out = ClassifierFreeGuidance(model, 4.0, NULL)(x, t, y=y)
    out_c, out_u = model(x, t, y), model(x, t, torch.full_like(y, NULL))
    torch.testing.assert_close(out[:, :1], out_u[:, :1] + 4.0 * (out_c[:, :1] - out_u[:, :1]),
                               rtol=1e-12, atol=1e-12)
    assert torch.equal(out[:, 1:], out_c[:, 1:])  # (B, 2C) -> the variance part is conditional
    # and through the process: Σ_θ is the conditional model's
    diffusion = process("learned_range")
    guided, kwargs = apply_guidance(model, {"y": y, NULL_LABEL_KEY: NULL}, 4.0)
    got = diffusion.p_mean_variance(guided, x, t, model_kwargs=kwargs)
    want = diffusion.p_mean_variance(model, x, t, model_kwargs={"y": y})
    assert torch.equal(got["log_variance"], want["log_variance"])
    assert not torch.allclose(got["mean"], want["mean"])


def test_null_label_never_reaches_the_model_and_the_callers_dict_is_kept():
    model, y = LabelModel(), labels()
    kwargs = {"y": y, NULL_LABEL_KEY: NULL}
    DDPMSampler(steps=3)(process(), model, shape=(6, 1, 2, 2), model_kwargs=kwargs)
    assert set(kwargs) == {"y", NULL_LABEL_KEY}


def test_guidance_errors():
    y = labels()
    with pytest.raises(ValueError, match="unconditional"):
        DDIMSampler(steps=5, guidance_scale=3.0)(process(), LabelModel(), shape=(6, 1, 2, 2))
    with pytest.raises(ValueError, match="null class.*label_dropout"):
        draw(DDIMSampler(steps=5, guidance_scale=3.0), LabelModel(), y, null_label=None)
    for bad in ("3", float("nan"), True):
        with pytest.raises(ValueError, match="guidance_scale must be null .* finite number"):
            DDIMSampler(steps=5, guidance_scale=bad).check(process())
    # None and 1 need neither labels nor a null class
    DDIMSampler(steps=5, guidance_scale=1).check(process())
    DDIMSampler(steps=5, guidance_scale=1)(process(), lambda x, t: x, shape=(2, 1, 2, 2))


def test_every_sampler_config_takes_a_guidance_scale(tmp_path, monkeypatch):
    for path in sorted(SAMPLER_CONFIGS.glob("*.yaml")):
        cfg = OmegaConf.merge(OmegaConf.load(path), {"guidance_scale": 3.0})
        assert instantiate(cfg).guidance_scale == 3.0, path.name
    monkeypatch.chdir(REPO)
    cfg = compose_config("sample", ["ckpt=unused", "sampler=ddpm100", "sampler.guidance_scale=2"],
                         tmp_path)
    assert instantiate(cfg.sampler) == DDPMSampler(steps=100, guidance_scale=2)


# ------------------------------------------------------------------------------- the UNet
def test_null_class_adds_one_embedding_row_and_round_trips_its_config():
    net = tiny_unet()
    assert net.null_label == NULL and net.label_emb.num_embeddings == NUM_CLASSES + 1
    assert UNet(**net.config()).null_label == NULL
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    out_null = net(x, torch.tensor([3, 3]), y=torch.tensor([NULL, NULL]))
    assert not torch.equal(out_null, net(x, torch.tensor([3, 3]), y=torch.tensor([0, 0])))
    plain = tiny_unet(null_class=False)
    assert plain.null_label is None and plain.label_emb.num_embeddings == NUM_CLASSES
    with pytest.raises(ValueError, match="null_class=True needs a class-conditional UNet"):
        UNet(image_size=8, in_channels=1, out_channels=1, null_class=True, **TINY)


# ------------------------------------------------------------------------ label dropout
def tiny_module(label_dropout, num_classes=NUM_CLASSES) -> DiffusionModule:
    diffusion = GaussianDiffusion(betas=get_named_beta_schedule("cosine", 20),
                                  model_mean_type="epsilon", model_var_type="fixed_small",
                                  loss_type="mse")
    return DiffusionModule(functools.partial(UNet, **TINY), diffusion, image_size=8, in_channels=1,
                           num_classes=num_classes, label_dropout=label_dropout)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_label_dropout_trains_the_null_row_only_through_dropped_labels():
    torch.manual_seed(0)
    module = tiny_module(0.5)
    emb = module.model.label_emb.weight
    before = emb.detach().clone()
    optimizer = torch.optim.SGD(module.model.parameters(), lr=0.5)  # no decay: unused rows stay
    x, y = torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8) % 2  # class 2 never appears
    for step in range(3):  # the zero-initialised output layer lets gradients through from step 2
        optimizer.zero_grad()
        module.training_step((x, y), step).backward()
        optimizer.step()
    changed = (emb.detach() != before).any(dim=1)
    assert changed.tolist() == [True, True, False, True]  # rows 0, 1, (not 2), null
    plain = tiny_module(0.0)
    assert plain.model.null_label is None and plain.model.label_emb.num_embeddings == NUM_CLASSES


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_label_dropout_drops_each_label_with_its_probability(monkeypatch):
    module, seen = tiny_module(0.3), {}

    def training_losses(model, x_start, t, model_kwargs=None):
        seen["y"] = model_kwargs["y"]
        return {"loss": torch.zeros(x_start.shape[0], requires_grad=True)}

    monkeypatch.setattr(module.diffusion, "training_losses", training_losses)
    torch.manual_seed(0)
    y = torch.arange(20000) % NUM_CLASSES
    module.training_step((torch.zeros(len(y), 1, 1, 1), y), 0)
    dropped = seen["y"] == NULL
    # 5 standard errors of a Bernoulli(0.3) mean over 20000 labels
    assert abs(dropped.double().mean().item() - 0.3) < 5 * (0.3 * 0.7 / len(y)) ** 0.5
    assert torch.equal(seen["y"][~dropped], y[~dropped])


def test_label_dropout_errors():
    with pytest.raises(ValueError, match="needs a class-conditional run"):
        tiny_module(0.1, num_classes=None)
    for bad in (1.0, -0.1, "0.1"):
        with pytest.raises(ValueError, match="label_dropout"):
            tiny_module(bad)


# ---------------------------------------------------------------- checkpoint and sample job
def write_checkpoint(cfg, path: Path) -> None:
    """What train.py's checkpoint holds for the module built from ``cfg`` (hyper-parameters
    with the run config, the weights), without the seconds of a Lightning run."""
    module = build_module(cfg, instantiate(cfg.data))
    with torch.no_grad():
        module.model.label_emb.weight.normal_()  # a trained-looking null row
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(),
                "global_step": 0}, path)


def test_checkpoint_rebuilds_the_null_class_and_the_job_samples_guided(compose_cfg, tmp_path):
    cfg = compose_cfg("train", [*TINY_RUN, "class_cond=true", "module.label_dropout=0.5"])
    write_checkpoint(cfg, tmp_path / "cfg.ckpt")
    loaded = load_checkpoint(str(tmp_path / "cfg.ckpt"))  # strict: needs the null row
    assert loaded.num_classes == 10 and loaded.model.null_label == 10
    assert loaded.model.label_emb.num_embeddings == 11
    cfg = compose_cfg("sample", ["progress=false", f"ckpt={tmp_path / 'cfg.ckpt'}",
                                 "sampler=ddim10", "sampler.steps=2", "sampler.guidance_scale=3.0",
                                 "num_samples=3", "batch_size=3", "device=cpu"],
                      output_dir=tmp_path / "samples")
    arrays = np.load(sample_job.sample(cfg)["npz"])
    assert arrays["arr_0"].shape == (3, 8, 8, 1)
    assert arrays["arr_1"].shape == (3,) and set(arrays["arr_1"]) <= set(range(10))


def test_the_job_refuses_guidance_for_an_unconditional_model(compose_cfg, tmp_path, monkeypatch):
    diffusion = process(num_timesteps=50)
    loaded = LoadedCheckpoint(model=GaussianDataDenoiser(diffusion, 0.0, 0.5), diffusion=diffusion,
                              config={}, image_shape=(1, 2, 2), num_classes=None,
                              weights="analytic", global_step=None)
    monkeypatch.setattr(sample_job, "load_checkpoint", lambda path, weights: loaded)
    cfg = compose_cfg("sample", ["ckpt=analytic", "sampler=ddim10", "sampler.guidance_scale=2",
                                 "progress=false"], output_dir=tmp_path / "samples")
    with pytest.raises(ValueError, match="unconditional: use guidance_scale=null"):
        sample_job.sample(cfg)
    assert not Path(tmp_path / "samples").exists() or not any((tmp_path / "samples").iterdir())
