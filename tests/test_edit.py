"""edit.py: DDIM inversion and reconstruction, slerp, SDEdit, the job end to end, bad input;
class-conditional and guided editing on a tiny class-conditional checkpoint.

The math runs on the analytic Gaussian denoiser (process.analytic.GaussianDataDenoiser, the
Bayes-optimal model of N(μ, s²) data), in float64, so every error left is the sampler's
discretisation and not a model's.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion import GaussianDiffusion, get_named_beta_schedule
from diffusion.data.digits import digits_images
from diffusion.jobs.edit import edit
from diffusion.jobs.sample import sample
from diffusion.process.analytic import GaussianDataDenoiser
from diffusion.process.respace import respace
from diffusion.sampling import DDIMSampler, DDPMSampler
from diffusion.sampling.inversion import ddim_invert, sdedit, slerp, slerp_row

MU, STD = 0.2, 0.3


def make_diffusion(num_timesteps=1000):
    return GaussianDiffusion(betas=get_named_beta_schedule("linear", num_timesteps), model_mean_type="epsilon",
                             model_var_type="fixed_small", loss_type="mse")


def gaussian_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MU + STD * torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)


def reconstruction_mse(steps: int) -> float:
    diffusion = make_diffusion()
    model = GaussianDataDenoiser(diffusion, MU, STD)
    sampler = DDIMSampler(steps=steps)
    x = gaussian_data()
    z = ddim_invert(diffusion, model, x, sampler, clip_denoised=False)
    return float(((sampler(diffusion, model, noise=z, clip_denoised=False) - x) ** 2).mean())


def test_inversion_then_decoding_returns_the_input_and_the_error_shrinks_with_the_steps():
    """Encode with DDIM inversion, decode with the same DDIM sampler (linear T = 1000,
    uniform steps, 64 draws of N(0.2, 0.3²) on 4x4, the optimal denoiser, no clipping).
    Measured mean squared error per dimension ([−1, 1] units; the data's variance is 0.09):
    10 steps 3.18e-2, 20 steps 1.13e-2, 50 steps 2.26e-3, 100 steps 6.2e-4."""
    errors = [reconstruction_mse(n) for n in (10, 20, 50, 100)]
    assert errors == pytest.approx([3.18e-2, 1.13e-2, 2.26e-3, 6.15e-4], rel=0.02)
    assert errors[0] > 2.5 * errors[1] > 2.5 * 2 * errors[2] > 2.5 * 2 * 3 * errors[3]
    assert errors[-1] < 0.01 * STD**2  # at 100 steps, 1 % of the data's variance


def test_inversion_of_the_exact_latent_of_a_one_step_sampler():
    """With one step the map is affine and known in closed form: DDIM inversion from x_0 uses
    ε̂(x_0, τ_0), then x_T = √ᾱ x_0 + √(1−ᾱ) ε̂ with the optimal ε̂ at τ_0 = 0."""
    diffusion = make_diffusion()
    model = GaussianDataDenoiser(diffusion, MU, STD)
    x = gaussian_data(8)
    z = ddim_invert(diffusion, model, x, DDIMSampler(steps=1), clip_denoised=False)
    ab = float(diffusion.alphas_cumprod[0])
    a, b = math.sqrt(ab), math.sqrt(1 - ab)
    x0_hat = MU + a * STD**2 / (ab * STD**2 + b * b) * (x - a * MU)  # E[x_0 | x_t = x]
    eps = (x - a * x0_hat) / b
    torch.testing.assert_close(z, a * x + b * eps, rtol=1e-10, atol=1e-10)


def test_inversion_refuses_a_stochastic_or_non_ddim_sampler():
    diffusion = make_diffusion(100)
    model = GaussianDataDenoiser(diffusion, MU, STD)
    with pytest.raises(ValueError, match="eta"):
        ddim_invert(diffusion, model, gaussian_data(2), DDIMSampler(steps=10, eta=0.5))
    with pytest.raises(ValueError, match="DDIM sampler"):
        ddim_invert(diffusion, model, gaussian_data(2), DDPMSampler(steps=10))


def test_sdedit_at_strength_0_is_the_input_and_at_1_is_ddim_sampling_from_the_same_noise():
    diffusion = make_diffusion(100)
    model = GaussianDataDenoiser(diffusion, MU, STD)
    sampler = DDIMSampler(steps=10)
    x = gaussian_data(6)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(sdedit(diffusion, model, x, 0.0, sampler, noise=noise), x)
    torch.testing.assert_close(sdedit(diffusion, model, x, 1.0, sampler, noise=noise),
                               sampler(diffusion, model, noise=noise), rtol=0, atol=0)
    half = sdedit(diffusion, model, x, 0.5, sampler, noise=noise)  # in between: nearer the input
    assert ((half - x) ** 2).mean() < ((sampler(diffusion, model, noise=noise) - x) ** 2).mean()
    with pytest.raises(ValueError, match=r"strength=1.5 must be in \[0, 1\]"):
        sdedit(diffusion, model, x, 1.5, sampler, noise=noise)


def test_sdedit_runs_the_sampler_steps_below_t0_from_the_noised_input():
    """s = 0.5 on T = 100, ddim10 (steps 0, 10, ..., 90): t_0 = 50, so the steps 50, 40, ...,
    0 run from q(x_50 | x_0): the same as a DDIM sampler over those six steps started there."""
    diffusion = make_diffusion(100)
    model = GaussianDataDenoiser(diffusion, MU, STD)
    x = gaussian_data(4)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = sdedit(diffusion, model, x, 0.5, DDIMSampler(steps=10), noise=noise)
    t = torch.full((4,), 50, dtype=torch.long)
    start = diffusion.q_sample(x, t, noise=noise)
    want = respace(diffusion, [0, 10, 20, 30, 40, 50]).ddim_sample_loop(model, tuple(x.shape), noise=start)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_slerp_ends_and_norms():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    row = slerp_row(z0, z1, 5)
    assert torch.equal(row[0], z0)
    torch.testing.assert_close(row[-1], z1, rtol=1e-12, atol=1e-12)
    # orthogonal ends of norms a, b: |slerp(α)|² = a² cos²(απ/2) + b² sin²(απ/2)
    e0 = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    e1 = torch.zeros_like(e0)
    e0[0, 0], e1[0, 1] = 2.0, 3.0
    for alpha in (0.25, 0.5, 0.8):
        norm = slerp(e0, e1, alpha).norm()
        want = math.sqrt(4 * math.cos(alpha * math.pi / 2) ** 2 + 9 * math.sin(alpha * math.pi / 2) ** 2)
        assert float(norm) == pytest.approx(want, rel=1e-12)
    # ends of one norm r keep it all along (the latents stay on the sphere)
    z1 = z1 * z0.norm() / z1.norm()
    norms = slerp_row(z0, z1, 7).flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, float(z0.norm())), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------- the job
def edit_cfg(compose_cfg, tmp_path, ckpt, *overrides):
    return compose_cfg("edit", ["progress=false", f"ckpt={ckpt}", "sampler=ddim10", *overrides],
                       output_dir=tmp_path / "out")


def digits_npz(path, count=5, shape=(8, 8, 1)):
    pixels = np.random.default_rng(0).integers(0, 256, (count, *shape), dtype=np.uint8)
    np.savez(path, arr_0=pixels)
    return path


def test_reconstruct_from_the_test_split_writes_npz_grid_and_json(compose_cfg, tiny_ckpt, tmp_path):
    report = edit(edit_cfg(compose_cfg, tmp_path, tiny_ckpt, "task=reconstruct", "num_images=6", "batch_size=4"))
    arrays = np.load(report["npz"])
    assert arrays["arr_0"].shape == (6, 8, 8, 1) and arrays["arr_0"].dtype == np.uint8
    assert arrays["latents"].shape == (6, 1, 8, 8)
    saved = json.load(open(report["json"]))
    assert saved["num_steps"] == 10 and saved["mse_per_dim"] == pytest.approx(report["mse_per_dim"])
    assert 0 <= saved["mse_per_dim"] < 4
    assert Image.open(report["grid"]).size[0] > 8
    assert sorted(os.listdir(tmp_path / "out")) == ["reconstruct.json", "reconstruct_6x8x8x1.npz",
                                                     "reconstruct_6x8x8x1.png"]


def test_sdedit_interpolate_and_encode_on_an_npz_and_a_folder(compose_cfg, tiny_ckpt, tmp_path):
    npz = digits_npz(tmp_path / "in.npz")
    zero = edit(edit_cfg(compose_cfg, tmp_path / "s0", tiny_ckpt, "task=sdedit", f"input={npz}", "strength=0"))
    np.testing.assert_array_equal(np.load(zero["npz"])["arr_0"], np.load(npz)["arr_0"])
    assert zero["mse_per_dim"] == 0
    seeds = edit(edit_cfg(compose_cfg, tmp_path / "i", tiny_ckpt, "task=interpolate", "interpolation.source=seeds",
                          "interpolation.num_pairs=2", "interpolation.num_images=4"))
    assert np.load(seeds["npz"])["arr_0"].shape == (8, 8, 8, 1)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, pixels in enumerate(np.load(npz)["arr_0"][:4]):
        Image.fromarray(pixels[..., 0]).save(folder / f"{i}.png")
    pairs = edit(edit_cfg(compose_cfg, tmp_path / "p", tiny_ckpt, "task=interpolate", f"input={folder}",
                          "interpolation.num_images=3"))
    assert np.load(pairs["npz"])["arr_0"].shape == (6, 8, 8, 1)
    encoded = edit(edit_cfg(compose_cfg, tmp_path / "e", tiny_ckpt, "task=encode", f"input={folder}"))
    assert np.load(encoded["npz"])["latents"].shape == (4, 1, 8, 8)


@pytest.mark.parametrize(("overrides", "message"), [
    (["task=paint"], "task='paint' is not one of encode"),
    (["task=sdedit", "strength=1.5"], r"strength=1.5 must be a number in \[0, 1\]"),
    (["task=reconstruct", "sampler=ddpm"], "needs a DDIM sampler"),
    (["task=reconstruct", "sampler.eta=0.5"], "pass sampler.eta=0"),
    (["task=reconstruct", "input=BAD_SIZE"], "is 16x16x1 .*takes 8x8x1: resize"),
    (["task=reconstruct", "input=BAD_CHANNELS"], "is 8x8x3 .*8x8x1.* with 1 channel"),
    (["task=reconstruct", "input=MISSING"], "no such folder or .npz file"),
    (["task=inpaint", "input=GOOD"], "task=inpaint .*needs a DDPM sampler; pass sampler=ddpm250"),
    (["task=inpaint", "sampler=ddpm", "input=GOOD", "inpaint.mask=BAD_MASK"],
     r"inpaint.mask=.*big.npy is 16x16; the checkpoint's images are 8x8: pass a 8x8 mask"),
    (["task=inpaint", "sampler=ddpm", "inpaint.mask=ring"], "inpaint.mask='ring' is not one of half"),
    (["task=inpaint", "sampler=ddpm", "inpaint.jump_length=0"], "inpaint.jump_length"),
])
def test_bad_input_is_one_error_and_nothing_is_written(compose_cfg, tiny_ckpt, tmp_path, overrides, message):
    paths = {"BAD_SIZE": digits_npz(tmp_path / "big.npz", shape=(16, 16, 1)),
             "BAD_CHANNELS": digits_npz(tmp_path / "rgb.npz", shape=(8, 8, 3)), "MISSING": tmp_path / "nothing",
             "GOOD": digits_npz(tmp_path / "good.npz")}
    np.save(tmp_path / "big.npy", np.ones((16, 16)))
    paths["BAD_MASK"] = tmp_path / "big.npy"
    overrides = [o.split("=")[0] + "=" + str(paths.get(o.split("=")[1], o.split("=")[1])) for o in overrides]
    with pytest.raises(ValueError, match=message):
        edit(edit_cfg(compose_cfg, tmp_path, tiny_ckpt, *overrides))
    assert not (tmp_path / "out").exists()


def test_inpaint_keeps_the_known_pixels_and_writes_masks_grid_and_json(compose_cfg, tiny_ckpt, tmp_path):
    """RePaint on 5 steps with jumps (j = 2, r = 2): the known pixels of the npz are the
    input's exactly; the grid has three rows (input, masked input, result)."""
    npz = digits_npz(tmp_path / "in.npz")
    args = ["task=inpaint", "sampler=ddpm", "sampler.steps=5", f"input={npz}", "inpaint.jump_length=2",
            "inpaint.jump_n_sample=2", "batch_size=3"]
    report = edit(edit_cfg(compose_cfg, tmp_path / "c", tiny_ckpt, *args, "inpaint.mask=center"))
    arrays, pixels = np.load(report["npz"]), np.load(npz)["arr_0"]
    masks = arrays["masks"].astype(bool)
    assert arrays["arr_0"].shape == (5, 8, 8, 1) and masks.shape == (5, 8, 8) and (~masks[:, 2:6, 2:6]).all()
    np.testing.assert_array_equal(arrays["arr_0"][masks], pixels[masks])
    saved = json.load(open(report["json"]))
    assert saved["model_calls"] == 9 and saved["known_fraction"] == 0.75 and saved["timesteps"] == report["timesteps"]
    assert Image.open(report["grid"]).size[1] > 3 * 8
    strokes = [edit(edit_cfg(compose_cfg, tmp_path / f"s{i}", tiny_ckpt, *args, "inpaint.mask=strokes"))
               for i in range(2)]  # one seed, one set of strokes and images
    np.testing.assert_array_equal(np.load(strokes[0]["npz"])["masks"], np.load(strokes[1]["npz"])["masks"])
    np.testing.assert_array_equal(np.load(strokes[0]["npz"])["arr_0"], np.load(strokes[1]["npz"])["arr_0"])
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:, :4] = 255  # white = known
    Image.fromarray(mask).save(tmp_path / "mask.png")
    png = edit(edit_cfg(compose_cfg, tmp_path / "p", tiny_ckpt, *args, f"inpaint.mask={tmp_path / 'mask.png'}"))
    np.testing.assert_array_equal(np.load(png["npz"])["arr_0"][:, :, :4], pixels[:, :, :4])
    np.save(tmp_path / "ones.npy", np.ones((8, 8)))
    ones = edit(edit_cfg(compose_cfg, tmp_path / "o", tiny_ckpt, *args, f"inpaint.mask={tmp_path / 'ones.npy'}"))
    np.testing.assert_array_equal(np.load(ones["npz"])["arr_0"], pixels)


# ------------------------------------------------------- class-conditional and guided models
def test_guidance_applies_to_inversion_and_sdedit_as_to_sampling():
    """A toy class-conditional model, ε̂(x, t, y) = ε̂*(x, t) + 0.05 y with ε̂* the optimal
    denoiser and null label 0: under guidance_scale w every edit runs with the guided
    ε̃ = ε̂* + 0.05 w y, exactly as with an unconditional model that returns ε̃."""
    diffusion = make_diffusion(100)
    optimal = GaussianDataDenoiser(diffusion, MU, STD)
    scale, labels = 3.0, torch.tensor([1, 2, 0, 5])

    def conditional(x, t, y):
        return optimal(x, t) + 0.05 * y.view(-1, 1, 1, 1).to(x.dtype)  # (B,) -> (B, 1, 1, 1)

    def guided(x, t):  # ε̂_u + w (ε̂_c − ε̂_u)
        return optimal(x, t) + 0.05 * scale * labels.view(-1, 1, 1, 1).to(x.dtype)

    kwargs = {"y": labels, "null_label": 0}
    x = gaussian_data(4)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with_guidance, plain = DDIMSampler(steps=10, guidance_scale=scale), DDIMSampler(steps=10)
    torch.testing.assert_close(ddim_invert(diffusion, conditional, x, with_guidance, model_kwargs=kwargs),
                               ddim_invert(diffusion, guided, x, plain), rtol=1e-12, atol=1e-12)
    for strength in (0.5, 1.0):
        torch.testing.assert_close(
            sdedit(diffusion, conditional, x, strength, with_guidance, noise=noise, model_kwargs=kwargs),
            sdedit(diffusion, guided, x, strength, plain, noise=noise), rtol=1e-12, atol=1e-12)


def cond_cfg(compose_cfg, tmp_path, ckpt, *overrides):
    return edit_cfg(compose_cfg, tmp_path, ckpt, "num_images=5", "batch_size=3", *overrides)


def test_class_conditional_reconstruct_and_sdedit_at_strength_0(compose_cfg, tiny_cond_ckpt, tmp_path):
    """Inversion and decoding with each test image's own label round-trip (the tiny model's
    error, well below the data's spread); the labels reach the npz (arr_1) and the JSON.
    SDEdit at strength 0 towards another class returns the input."""
    report = edit(cond_cfg(compose_cfg, tmp_path / "r", tiny_cond_ckpt, "task=reconstruct", "class_labels=input"))
    test_labels = digits_images("test")[1][:5].tolist()
    assert report["labels"] == test_labels and report["class_labels"] == "input"
    np.testing.assert_array_equal(np.load(report["npz"])["arr_1"], test_labels)
    assert json.load(open(report["json"]))["labels"] == test_labels
    assert report["mse_per_dim"] < 0.05
    npz = digits_npz(tmp_path / "in.npz")
    zero = edit(cond_cfg(compose_cfg, tmp_path / "s", tiny_cond_ckpt, "task=sdedit", "strength=0", f"input={npz}",
                         "class_labels=[8]", "sampler.guidance_scale=2"))
    np.testing.assert_array_equal(np.load(zero["npz"])["arr_0"], np.load(npz)["arr_0"])
    assert zero["labels"] == [8] * 5 and zero["guidance_scale"] == 2


def test_the_target_class_reaches_the_model(compose_cfg, tiny_cond_ckpt, tmp_path):
    """SDEdit at strength 1 is sampling from batch i's noise (seed, i): towards class 3 it
    gives sample.py's class_labels=3 images (guided too), and class 8 gives others."""
    npz = digits_npz(tmp_path / "in.npz")

    def sdedit_to(label, *extra):
        report = edit(cond_cfg(compose_cfg, tmp_path / f"e{label}{len(extra)}", tiny_cond_ckpt, "task=sdedit",
                               "strength=1", f"input={npz}", f"class_labels={label}", *extra))
        return np.load(report["npz"])["arr_0"]

    def sample_of(label, *extra):
        cfg = compose_cfg("sample", ["progress=false", f"ckpt={tiny_cond_ckpt}", "sampler=ddim10", "num_samples=5",
                                     "batch_size=3", f"class_labels={label}", *extra],
                          output_dir=tmp_path / f"s{label}{len(extra)}")
        return np.load(sample(cfg)["npz"])["arr_0"]

    three = sdedit_to(3)
    np.testing.assert_array_equal(three, sample_of(3))
    assert (three != sdedit_to(8)).mean() > 0.1
    np.testing.assert_array_equal(sdedit_to(3, "sampler.guidance_scale=3"), sample_of(3, "sampler.guidance_scale=3"))


def test_interpolate_keeps_one_class_per_row_and_inpaint_fills_towards_the_class(compose_cfg, tiny_cond_ckpt,
                                                                                   tmp_path):
    report = edit(cond_cfg(compose_cfg, tmp_path / "i", tiny_cond_ckpt, "task=interpolate", "class_labels=[2,7]",
                           "interpolation.source=seeds", "interpolation.num_pairs=2", "interpolation.num_images=3"))
    assert report["labels"] == [2, 2, 2, 7, 7, 7]
    np.testing.assert_array_equal(np.load(report["npz"])["arr_1"], [2, 2, 2, 7, 7, 7])
    npz = digits_npz(tmp_path / "in.npz")
    args = ["task=inpaint", "sampler=ddpm", "sampler.steps=3", "inpaint.jump_n_sample=1", f"input={npz}"]
    filled = [np.load(edit(cond_cfg(compose_cfg, tmp_path / f"p{k}", tiny_cond_ckpt, *args, f"class_labels={k}"))["npz"])
              for k in (2, 5)]
    masks = filled[0]["masks"].astype(bool)
    for arrays in filled:  # the known pixels are the input's whatever the class
        np.testing.assert_array_equal(arrays["arr_0"][masks], np.load(npz)["arr_0"][masks])
    assert (filled[0]["arr_0"] != filled[1]["arr_0"]).any() and list(filled[1]["arr_1"]) == [5] * 5


@pytest.mark.parametrize(("ckpt", "overrides", "message"), [
    ("cond", [], r"class_labels is not set: .* is class-conditional \(classes 0..9\); pass .*class_labels=K in 0..9"),
    ("cond", ["class_labels=10"], r"class_labels=10: \[10\] outside the checkpoint's classes 0..9"),
    ("cond", ["class_labels=[1,-1]"], r"\[-1\] outside the checkpoint's classes 0..9"),
    ("cond", ["class_labels=seven"], "class_labels='seven' must be a class index"),
    ("cond", ["class_labels=input", "input=GOOD"], "class_labels=input takes each image's label from a split"),
    ("cond", ["task=interpolate", "interpolation.source=seeds", "class_labels=input"], "class_labels=input takes"),
    ("plain", ["class_labels=3"], r"class_labels=3: .* is unconditional \(no classes\); leave class_labels=null"),
    ("plain", ["sampler.guidance_scale=2"], "needs a class-conditional model"),
])
def test_class_errors_are_one_line_and_nothing_is_written(compose_cfg, tiny_ckpt, tiny_cond_ckpt, tmp_path, ckpt,
                                                          overrides, message):
    good = digits_npz(tmp_path / "good.npz")
    overrides = [o.replace("GOOD", str(good)) for o in overrides]
    with pytest.raises(ValueError, match=message) as err:
        edit(cond_cfg(compose_cfg, tmp_path, tiny_cond_ckpt if ckpt == "cond" else tiny_ckpt, *overrides))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
