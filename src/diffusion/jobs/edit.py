"""`edit(cfg)`: DDIM inversion, reconstruction, interpolation and SDEdit of images.

    task=encode       x_T of each input (DDIM inversion, `diffusion.sampling.inversion`)
    task=reconstruct  encode, then decode with the same DDIM sampler; reports the error
    task=interpolate  a row of images per pair along the slerp of two latents (DDIM Fig. 6):
                      consecutive input images, or two noises per pair (source=seeds)
    task=sdedit       noise to t_0 = s (T − 1), denoise with the sampler's steps (Meng et al. 2022)
    task=inpaint      fill the 0 region of a mask with RePaint on the DDPM sampler's steps
                      (Lugmayr et al. 2022, `diffusion.sampling.repaint`); masks: 1 = known

The inputs are an image folder, an npz in sample.py's format (uint8 NHWC ``arr_0``) or a
split of the run's dataset; they are checked against the checkpoint's image shape before
anything is written. Batch ``i`` draws its randomness from the generator seeded with
``(seed, i)`` (`batch_generator`), as in sample.py. Each task writes ``<task>_NxHxWxC.npz``
(``arr_0`` uint8 NHWC images; encode and reconstruct also ``latents``, float32 NCHW;
inpaint also ``masks``, uint8 NHW, 1 = known), a PNG grid (inputs above their results;
inpaint: inputs, masked inputs, results) and ``<task>.json`` (the settings and, where there
is an input to compare with, the mean squared error per dimension in [−1, 1] units, the
measure of DDIM's Table 2), all atomically.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from diffusion.checkpoint import LoadedCheckpoint
from diffusion.jobs.checks import build_sampler, check_sampler, check_weights
from diffusion.jobs.common import (
    PRECISIONS,
    autocast_network,
    batch_generator,
    images_progress,
    resolve_devices,
)
from diffusion.jobs.evaluate import data_for, split_loader
from diffusion.jobs.inputs import read_uint8_images, shape_error, to_model_range
from diffusion.jobs.sample import load_chosen_weights, to_uint8_nhwc
from diffusion.process._tensor import randn
from diffusion.sampling.ddim import DDIMSampler
from diffusion.sampling.ddpm import DDPMSampler
from diffusion.sampling.inversion import ddim_invert, sdedit, sdedit_start_step, slerp_row
from diffusion.sampling.repaint import (
    MASKS,
    builtin_mask,
    model_calls,
    repaint,
    resampling_schedule,
)
from diffusion.utils.atomic import atomic_save_json, atomic_savez, remove_stale_temporaries
from diffusion.utils.checks import require_bool, require_choice, require_int, require_writable_dir
from diffusion.utils.errors import ConfigError
from diffusion.utils.images import save_image_grid
from diffusion.utils.lock import folder_lock

log = logging.getLogger(__name__)

TASKS = ("encode", "reconstruct", "interpolate", "sdedit", "inpaint")
SOURCES = ("images", "seeds")
SPLITS = ("train", "val", "test")


# ------------------------------------------------------------------------------ checks
def check_edit_settings(cfg: DictConfig) -> None:
    """Every setting of edit.yaml but the sampler's and the input's (checked once the
    checkpoint says what images it takes)."""
    if not isinstance(cfg.get("ckpt"), str) or not cfg.ckpt or cfg.ckpt == "???":
        raise ConfigError("ckpt is not set: pass ckpt=PATH, a checkpoint written by train.py")
    require_choice("task", cfg.task, TASKS)
    for key, minimum in (("num_images", 1), ("batch_size", 1), ("seed", 0)):
        require_int(key, cfg[key], minimum)
    strength = cfg.strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise ConfigError(f"strength={strength!r} must be a number in [0, 1] (0 returns the input, 1 samples "
                          "from noise); pass e.g. strength=0.5")
    require_choice("interpolation.source", cfg.interpolation.source, SOURCES)
    require_int("interpolation.num_pairs", cfg.interpolation.num_pairs, 1)
    require_int("interpolation.num_images", cfg.interpolation.num_images, 2)
    require_choice("split", cfg.split, SPLITS)
    require_int("inpaint.jump_length", cfg.inpaint.jump_length, 1)
    require_int("inpaint.jump_n_sample", cfg.inpaint.jump_n_sample, 1)
    mask = cfg.inpaint.mask
    if not isinstance(mask, str) or not (mask in MASKS or mask.endswith((".png", ".npy"))):
        raise ConfigError(f"inpaint.mask={mask!r} is not one of {', '.join(MASKS)}, nor a .png or .npy file "
                          "(1 = known, 0 = to fill)")
    check_weights(cfg.weights)
    require_choice("precision", str(cfg.precision), PRECISIONS)
    require_bool("clip_denoised", cfg.clip_denoised)
    require_bool("progress", cfg.progress)


def check_ddim_sampler(sampler, cfg: DictConfig) -> None:
    if cfg.task == "inpaint":
        if not isinstance(sampler, DDPMSampler):
            raise ConfigError("task=inpaint (RePaint) runs ancestral steps and needs a DDPM sampler; pass "
                              "sampler=ddpm250 (or sampler=ddpm sampler.steps=N / sampler.respacing=...)")
        return
    if not isinstance(sampler, DDIMSampler):
        raise ConfigError(f"task={cfg.task} needs a DDIM sampler; pass sampler=ddim50 (or ddim10, ddim20, ...)")
    if cfg.task != "sdedit" and sampler.eta != 0:
        raise ConfigError(f"sampler.eta={sampler.eta}: DDIM inversion (task={cfg.task}) is deterministic; "
                          "pass sampler.eta=0")


# ------------------------------------------------------------------------------ inputs
def read_inputs(cfg: DictConfig, loaded: LoadedCheckpoint) -> torch.Tensor:
    """The first ``num_images`` input images as (N, C, H, W) floats in [−1, 1]."""
    if cfg.input is None:
        return _split_images(cfg, loaded)
    channels, height, width = loaded.image_shape
    pixels = read_uint8_images("input", cfg.input, (height, width, channels), cfg.num_images,
                               missing_hint="pass an image folder, an npz written by sample.py, or "
                                            "input=null for a split of the run's dataset")
    return to_model_range(pixels)


def _split_images(cfg: DictConfig, loaded: LoadedCheckpoint) -> torch.Tensor:
    batches, total = [], 0
    for images, _ in split_loader(data_for(cfg, loaded), cfg.split):
        batches.append(images)
        total += len(images)
        if total >= cfg.num_images:
            break
    images = torch.cat(batches)[: cfg.num_images]
    if tuple(images.shape[1:]) != tuple(loaded.image_shape):
        channels, height, width = loaded.image_shape
        found = (*images.shape[2:], images.shape[1])  # (C, H, W) -> HxWxC, as the message reads
        raise shape_error("input", f"split {cfg.split}", found, (height, width, channels))
    return images


def read_mask(cfg: DictConfig, image_shape) -> torch.Tensor | None:
    """The mask file of ``inpaint.mask`` as (1, 1, H, W) floats, 1 = known, 0 = to fill
    (PNG: pixels >= 128 of its grey version are known; npy: (H, W) of 0 and 1); None for
    a built-in mask (made per batch, `builtin_mask`)."""
    name = str(cfg.inpaint.mask)
    if name in MASKS:
        return None
    path = os.path.expanduser(name)
    if not os.path.isfile(path):
        raise ConfigError(f"inpaint.mask={name}: no such file; pass a .png or .npy mask or one of {', '.join(MASKS)}")
    if path.endswith(".npy"):
        pixels = np.load(path, allow_pickle=False)
        pixels = pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels
        if pixels.ndim == 2 and not np.isin(pixels, (0, 1)).all():
            raise ConfigError(f"inpaint.mask={name} holds values other than 0 and 1 (1 = known, 0 = to fill)")
    else:
        with Image.open(path) as image:
            pixels = (np.asarray(image.convert("L")) >= 128).astype(np.uint8)  # white = known
    height, width = image_shape[1], image_shape[2]
    if pixels.shape != (height, width):
        raise ConfigError(f"inpaint.mask={name} is {'x'.join(map(str, pixels.shape))}; the checkpoint's images "
                          f"are {height}x{width}: pass a {height}x{width} mask (1 = known, 0 = to fill)")
    return torch.from_numpy(pixels.astype(np.float32)).view(1, 1, height, width)


# ------------------------------------------------------------------------------- tasks
class _Job:
    """What every task needs: the checkpoint's process and model, the sampler, a device."""

    def __init__(self, cfg: DictConfig, loaded: LoadedCheckpoint, sampler: DDIMSampler | DDPMSampler, device: torch.device,
                 advance):
        self.cfg, self.loaded, self.sampler, self.device, self.advance = cfg, loaded, sampler, device, advance
        self.model = autocast_network(loaded.model.to(device), device, cfg.precision)

    def batches(self, images: torch.Tensor):
        for index, start in enumerate(range(0, len(images), self.cfg.batch_size)):
            yield index, images[start:start + self.cfg.batch_size].to(self.device)

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        return ddim_invert(self.loaded.diffusion, self.model, x, self.sampler, clip_denoised=self.cfg.clip_denoised)

    def decode(self, z: torch.Tensor, generator=None) -> torch.Tensor:
        return self.sampler(self.loaded.diffusion, self.model, noise=z, clip_denoised=self.cfg.clip_denoised,
                            generator=generator)


def run_encode(job: _Job, images: torch.Tensor, decode: bool) -> dict[str, Any]:
    latents, outputs = [], []
    for _, x in job.batches(images):
        z = job.invert(x)
        latents.append(z.float().cpu())
        if decode:
            outputs.append(job.decode(z).float().cpu())
        job.advance(len(x))
    result = {"latents": torch.cat(latents), "inputs": images}
    if decode:
        result["outputs"] = torch.cat(outputs)
    return result


def run_sdedit(job: _Job, images: torch.Tensor) -> dict[str, Any]:
    outputs = []
    for index, x in job.batches(images):
        generator = batch_generator(job.cfg.seed, index, job.device)
        noise = randn(tuple(x.shape), generator, dtype=x.dtype, device=job.device)
        outputs.append(sdedit(job.loaded.diffusion, job.model, x, float(job.cfg.strength), job.sampler, noise=noise,
                              clip_denoised=job.cfg.clip_denoised, generator=generator).float().cpu())
        job.advance(len(x))
    return {"inputs": images, "outputs": torch.cat(outputs)}


def run_inpaint(job: _Job, images: torch.Tensor, mask: torch.Tensor | None) -> dict[str, Any]:
    """RePaint per batch; batch i draws its strokes (mask=strokes), x_T and every step's
    noise from the generator seeded with (seed, i)."""
    settings, masks, outputs = job.cfg.inpaint, [], []
    for index, x in job.batches(images):
        generator = batch_generator(job.cfg.seed, index, job.device)
        if mask is None:
            batch_mask = builtin_mask(str(settings.mask), x.shape[2], x.shape[3], len(x), generator)
        else:
            batch_mask = mask.expand(len(x), 1, *mask.shape[2:])
        outputs.append(repaint(job.loaded.diffusion, job.model, x, batch_mask.to(job.device), job.sampler,
                               jump_length=settings.jump_length, jump_n_sample=settings.jump_n_sample,
                               clip_denoised=job.cfg.clip_denoised, generator=generator).float().cpu())
        masks.append(batch_mask.cpu())
        job.advance(len(x))
    masks = torch.cat(masks)
    return {"inputs": images, "outputs": torch.cat(outputs), "masks": masks, "masked": images * masks}


def run_interpolate(job: _Job, images: torch.Tensor | None) -> dict[str, Any]:
    """A row of ``interpolation.num_images`` per pair: pair i is images (2i, 2i+1), or two
    noises drawn from the generator seeded with (seed, i)."""
    settings = job.cfg.interpolation
    if images is not None:
        if len(images) < 2:
            raise ConfigError("task=interpolate needs at least 2 input images (pairs of consecutive images); "
                              "pass more, or interpolation.source=seeds")
        ends = [job.invert(x) for _, x in job.batches(images[: len(images) // 2 * 2])]
        ends = torch.cat(ends).view(-1, 2, *images.shape[1:])  # (2P, C, H, W) -> (P, 2, C, H, W)
    else:
        shape = (2, *job.loaded.image_shape)
        ends = torch.stack([randn(shape, batch_generator(job.cfg.seed, i, job.device), device=job.device)
                            for i in range(settings.num_pairs)])
    rows = []
    for z0, z1 in ends:
        rows.append(job.decode(slerp_row(z0, z1, settings.num_images)).float().cpu())
        job.advance(1)
    return {"outputs": torch.cat(rows), "nrow": settings.num_images}


# ----------------------------------------------------------------------------- outputs
def mse_per_dim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared error per dimension in [−1, 1] units (DDIM Table 2's reconstruction error)."""
    return float(((a.double() - b.double()) ** 2).mean())


def write_outputs(cfg: DictConfig, result: dict[str, Any], report: dict[str, Any]) -> dict[str, str]:
    outputs = result.get("outputs", result.get("latents"))
    channels, height, width = outputs.shape[1:]
    stem = os.path.join(os.path.expanduser(cfg.output_dir), f"{cfg.task}_{len(outputs)}x{height}x{width}x{channels}")
    paths = {"npz": f"{stem}.npz", "grid": f"{stem}.png", "json": os.path.join(os.path.dirname(stem), f"{cfg.task}.json")}
    arrays = {} if "outputs" not in result else {"arr_0": to_uint8_nhwc(result["outputs"])}
    if "latents" in result:
        arrays["latents"] = result["latents"].numpy().astype(np.float32)
    if "masks" in result:
        arrays["masks"] = result["masks"][:, 0].numpy().astype(np.uint8)  # (N, 1, H, W) -> (N, H, W)
    atomic_savez(paths["npz"], **arrays)
    shown = result["outputs"] if "outputs" in result else result["latents"].clamp(-3, 3) / 3  # latents at ±3σ
    if "inputs" in result:  # inputs above their results, up to 16 per row
        count = min(len(shown), 16)
        rows = [result["inputs"][:count], *([result["masked"][:count]] if "masked" in result else []), shown[:count]]
        save_image_grid(torch.cat(rows), paths["grid"], nrow=count)
    else:
        save_image_grid(shown, paths["grid"], nrow=result.get("nrow"))
    atomic_save_json(paths["json"], {**report, **paths})
    return paths


def edit_report(cfg: DictConfig, loaded: LoadedCheckpoint, sampler: DDIMSampler | DDPMSampler, result: dict[str, Any]) -> dict:
    steps = sampler.timesteps(loaded.diffusion.num_timesteps)
    report = {"task": cfg.task, "ckpt": cfg.ckpt, "weights": loaded.weights, "num_steps": len(steps),
              "timesteps": steps, "eta": getattr(sampler, "eta", None), "clip_denoised": cfg.clip_denoised, "seed": cfg.seed,
              "num_images": len(result.get("outputs", result.get("latents")))}
    if cfg.task == "sdedit":
        report.update(strength=float(cfg.strength), t0=sdedit_start_step(loaded.diffusion.num_timesteps,
                                                                          float(cfg.strength)))
    if cfg.task == "inpaint":
        states = resampling_schedule(len(steps), cfg.inpaint.jump_length, cfg.inpaint.jump_n_sample)
        report.update(mask=str(cfg.inpaint.mask), jump_length=cfg.inpaint.jump_length,
                      jump_n_sample=cfg.inpaint.jump_n_sample, known_fraction=float(result["masks"].mean()),
                      model_calls=model_calls(states))
    if "inputs" in result and "outputs" in result:
        report["mse_per_dim"] = mse_per_dim(result["outputs"], result["inputs"])
        quantised = torch.from_numpy(to_uint8_nhwc(result["outputs"])).permute(0, 3, 1, 2).double() / 127.5 - 1
        report["mse_per_dim_8bit"] = mse_per_dim(quantised, result["inputs"])  # what the npz holds
    return report


def edit(cfg: DictConfig) -> dict[str, Any]:
    """Run the job; returns the report written to ``<task>.json`` (with the output paths)."""
    loaded, sampler, device = prepare(cfg)
    images = None
    if not (cfg.task == "interpolate" and cfg.interpolation.source == "seeds"):
        images = read_inputs(cfg, loaded)
    mask = read_mask(cfg, loaded.image_shape) if cfg.task == "inpaint" else None
    require_writable_dir("output_dir", cfg.output_dir)
    total = cfg.interpolation.num_pairs if images is None else len(images)
    if cfg.task == "interpolate" and images is not None:
        total = len(images) // 2
    with folder_lock(cfg.output_dir):
        remove_stale_temporaries(os.path.expanduser(cfg.output_dir))
        with images_progress(total, 0, cfg.task, enabled=cfg.progress) as advance:
            job = _Job(cfg, loaded, sampler, device, advance)
            with torch.inference_mode():
                result = (run_inpaint(job, images, mask) if cfg.task == "inpaint"
                          else TASK_RUNS[cfg.task](job, images))
        report = edit_report(cfg, loaded, sampler, result)
        report.update(write_outputs(cfg, result, report))
    log.info("%s: wrote %s, %s and %s", cfg.task, report["npz"], report["grid"], report["json"])
    return report


TASK_RUNS = {
    "encode": lambda job, images: run_encode(job, images, decode=False),
    "reconstruct": lambda job, images: run_encode(job, images, decode=True),
    "interpolate": run_interpolate,
    "sdedit": run_sdedit,
}


def prepare(cfg: DictConfig) -> tuple[LoadedCheckpoint, DDIMSampler | DDPMSampler, torch.device]:
    """Check every setting, load the checkpoint and build the sampler, before anything is written."""
    check_edit_settings(cfg)
    device = torch.device(resolve_devices(cfg.device, 1)[0])
    sampler = build_sampler(cfg.sampler)
    check_ddim_sampler(sampler, cfg)
    loaded = load_chosen_weights(cfg)
    check_sampler(sampler, cfg.sampler, loaded, None)
    if loaded.num_classes is not None:
        raise ConfigError(f"{cfg.ckpt} is class-conditional; edit.py edits with unconditional checkpoints only")
    return loaded, sampler, device
