"""`edit(cfg)`: DDIM inversion, reconstruction, interpolation and SDEdit of images.

    task=encode       x_T of each input (DDIM inversion, `diffusion.sampling.inversion`)
    task=reconstruct  encode, then decode with the same DDIM sampler; reports the error
    task=interpolate  a row of images per pair along the slerp of two latents (DDIM Fig. 6):
                      consecutive input images, or two noises per pair (source=seeds)
    task=sdedit       noise to t_0 = s (T − 1), denoise with the sampler's steps (Meng et al. 2022)
    task=inpaint      fill the 0 region of a mask with RePaint on the DDPM sampler's steps
                      (Lugmayr et al. 2022, `diffusion.sampling.repaint`); masks: 1 = known
    task=superres     a super-resolution checkpoint's outputs for low-resolution inputs, drawn
                      as sample.py draws them (`draw_batch`), beside their bicubic upsampling

The inputs are an image folder, an npz in sample.py's format (uint8 NHWC ``arr_0``) or a
split of the run's dataset (task=superres: low-resolution images, or a split's pairs); they
are checked against the checkpoint's image shape before anything is written. Batch ``i``
draws its randomness from the generator seeded with ``(seed, i)`` (`batch_generator`), as in
sample.py. Each task writes ``<task>_NxHxWxC.npz`` (``arr_0`` uint8 NHWC images; encode and
reconstruct also ``latents``, float32 NCHW; inpaint also ``masks``, uint8 NHW, 1 = known;
superres also ``low_res``, uint8 NHWC; class-conditional checkpoints also ``arr_1``, the
class of each image), a PNG grid (inputs above their results; inpaint: inputs, masked
inputs, results; superres: bicubic, outputs and, from a split, the originals) and
``<task>.json`` (the settings and, where there is an input to compare with, the mean squared
error per dimension in [−1, 1] units, the measure of DDIM's Table 2), all atomically.

Class-conditional checkpoints edit towards the classes of ``class_labels`` (one class, a
list cycled over the images, or ``input``: each split image's own label); interpolate keeps
one class per row (of its first image, with ``input``). Inversion runs with the same class
in both directions, and ``sampler.guidance_scale`` applies to every task as in sample.py
(inversion under guidance is approximate: `diffusion.sampling.inversion`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from diffusion.checkpoint import LoadedCheckpoint
from diffusion.jobs.checks import INPUT_LABELS, SPLITS, build_sampler, check_sampler, check_weights
from diffusion.jobs.common import PRECISIONS, images_progress, resolve_devices
from diffusion.jobs.edit_tasks import TASK_RUNS, EditJob
from diffusion.jobs.inputs import (
    checked_labels,
    read_split,
    read_uint8_images,
    shape_error,
    to_model_range,
)
from diffusion.jobs.sample import load_chosen_weights, null_label, to_uint8_nhwc
from diffusion.jobs.superres import low_res_size, read_low_res_images, split_low_res
from diffusion.sampling.ddim import DDIMSampler
from diffusion.sampling.ddpm import DDPMSampler
from diffusion.sampling.inversion import sdedit_start_step
from diffusion.sampling.repaint import MASKS, model_calls, resampling_schedule
from diffusion.utils.atomic import atomic_save_json, atomic_savez, remove_stale_temporaries
from diffusion.utils.checks import require_bool, require_choice, require_int, require_writable_dir
from diffusion.utils.errors import ConfigError
from diffusion.utils.host_memory import retain_freed_memory
from diffusion.utils.images import save_image_grid
from diffusion.utils.lock import folder_lock

log = logging.getLogger(__name__)

TASKS = ("encode", "reconstruct", "interpolate", "sdedit", "inpaint", "superres")
SOURCES = ("images", "seeds")


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
    given_classes(cfg.class_labels)


def given_classes(labels) -> list[int] | str | None:
    """``class_labels`` as a list of classes, ``input`` or None; a ConfigError otherwise."""
    if labels is None or labels == INPUT_LABELS:
        return labels
    given = OmegaConf.to_container(labels) if OmegaConf.is_list(labels) else labels
    given = [given] if isinstance(given, int) and not isinstance(given, bool) else given
    if not isinstance(given, list) or not given or any(isinstance(c, bool) or not isinstance(c, int) for c in given):
        raise ConfigError(f"class_labels={labels!r} must be a class index, a non-empty list of them (cycled over "
                          "the images), input (each split image's own label), or null for an unconditional checkpoint")
    return given


def check_class_labels(cfg: DictConfig, loaded: LoadedCheckpoint) -> None:
    """The target classes exist in the checkpoint, which has classes at all, and
    ``class_labels=input`` has a split's labels to take."""
    given, classes = given_classes(cfg.class_labels), loaded.num_classes
    if classes is None:
        if given is not None:
            raise ConfigError(f"class_labels={cfg.class_labels}: {cfg.ckpt} is unconditional (no classes); leave "
                              "class_labels=null")
        return
    valid = f"0..{classes - 1}"
    if given is None:
        raise ConfigError(f"class_labels is not set: {cfg.ckpt} is class-conditional (classes {valid}); pass the "
                          f"target class class_labels=K in {valid}, a list of them, or class_labels=input")
    if given == INPUT_LABELS:
        if cfg.input is not None or (cfg.task == "interpolate" and cfg.interpolation.source == "seeds"):
            raise ConfigError(f"class_labels=input takes each image's label from a split of the run's dataset: "
                              f"pass input=null (and split=...), or class_labels=K in {valid}")
        return
    bad = [c for c in given if not 0 <= c < classes]
    if bad:
        raise ConfigError(f"class_labels={cfg.class_labels}: {bad} outside the checkpoint's classes {valid}; pass "
                          f"classes in {valid}")


def check_ddim_sampler(sampler, cfg: DictConfig) -> None:
    if cfg.task == "superres":  # any sampler, as in sample.py
        return
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
def read_inputs(cfg: DictConfig, loaded: LoadedCheckpoint) -> dict[str, torch.Tensor]:
    """The first ``num_images`` inputs: ``images`` (N, C, H, W) floats in [−1, 1], from a split
    also its ``labels`` (N,); task=superres: ``low_res`` (N, C, s, s) and, from a split, the
    high-resolution originals as ``images``. Nothing for interpolate's source=seeds."""
    if cfg.task == "interpolate" and cfg.interpolation.source == "seeds":
        return {}
    if cfg.task == "superres":
        if cfg.input is not None:
            return {"low_res": read_low_res_images("input", cfg.input, loaded, cfg.num_images)}
        images, low_res, kwargs = split_low_res("input", cfg, loaded, cfg.split, cfg.num_images)
        return {"images": images, "low_res": low_res, "labels": kwargs.get("y")}
    if cfg.input is None:
        images, kwargs = read_split(cfg, loaded, cfg.split, cfg.num_images)
        if tuple(images.shape[1:]) != tuple(loaded.image_shape):
            channels, height, width = loaded.image_shape
            found = (*images.shape[2:], images.shape[1])  # (C, H, W) -> HxWxC, as the message reads
            raise shape_error("input", f"split {cfg.split}", found, (height, width, channels))
        return {"images": images, "labels": kwargs.get("y")}
    channels, height, width = loaded.image_shape
    pixels = read_uint8_images("input", cfg.input, (height, width, channels), cfg.num_images,
                               missing_hint="pass an image folder, an npz written by sample.py, or "
                                            "input=null for a split of the run's dataset")
    return {"images": to_model_range(pixels)}


def target_labels(cfg: DictConfig, loaded: LoadedCheckpoint, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The class each input image (interpolate: each row) is edited towards, (N,) int64;
    None for an unconditional checkpoint. An interpolated pair takes its first image's label."""
    if loaded.num_classes is None:
        return None
    count = len(inputs.get("low_res", inputs.get("images", ())))
    if cfg.task == "interpolate":
        count = cfg.interpolation.num_pairs if not inputs else count // 2
    given = given_classes(cfg.class_labels)
    if given == INPUT_LABELS:
        labels = checked_labels("class_labels", inputs.get("labels"), f"split {cfg.split} of the dataset", loaded.num_classes)
        return labels[0::2][:count] if cfg.task == "interpolate" else labels  # (2P,) -> (P,): each pair's first
    return torch.tensor([given[j % len(given)] for j in range(count)], dtype=torch.long)  # cycled, as sample.py


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
    if "labels" in result:  # sample.py's arr_1: the class of each image
        arrays["arr_1"] = result["labels"].numpy().astype(np.int64)
    if "latents" in result:
        arrays["latents"] = result["latents"].numpy().astype(np.float32)
    if "masks" in result:
        arrays["masks"] = result["masks"][:, 0].numpy().astype(np.uint8)  # (N, 1, H, W) -> (N, H, W)
    if "low_res" in result:
        arrays["low_res"] = to_uint8_nhwc(result["low_res"])
    atomic_savez(paths["npz"], **arrays)
    rows = grid_rows(result)
    save_image_grid(torch.cat(rows), paths["grid"], nrow=len(rows[0]) if len(rows) > 1 else result.get("nrow"))
    atomic_save_json(paths["json"], {**report, **paths})
    return paths


def grid_rows(result: dict[str, Any], count: int = 16) -> list[torch.Tensor]:
    """The grid's rows of up to ``count`` images: inputs (inpaint: and masked inputs) above
    their results; superres: bicubic above the outputs above the originals (from a split);
    else every output (latents at ±3σ), ``nrow`` a row."""
    shown = result["outputs"] if "outputs" in result else result["latents"].clamp(-3, 3) / 3
    if "bicubic" in result:
        rows = [result["bicubic"], shown, *([result["inputs"]] if "inputs" in result else [])]
    elif "inputs" in result:
        rows = [result["inputs"], *([result["masked"]] if "masked" in result else []), shown]
    else:
        return [shown]
    return [row[:count] for row in rows]


def edit_report(cfg: DictConfig, loaded: LoadedCheckpoint, sampler: DDIMSampler | DDPMSampler, result: dict[str, Any]) -> dict:
    steps = sampler.timesteps(loaded.diffusion.num_timesteps)
    seeds = cfg.task == "interpolate" and cfg.interpolation.source == "seeds"
    source = None if seeds else cfg.input if cfg.input is not None else f"split:{cfg.split}"
    report = {"task": cfg.task, "ckpt": cfg.ckpt, "weights": loaded.weights, "input": source, "num_steps": len(steps),
              "timesteps": steps, "eta": getattr(sampler, "eta", None), "clip_denoised": cfg.clip_denoised, "seed": cfg.seed,
              "num_images": len(result.get("outputs", result.get("latents"))),
              "guidance_scale": sampler.guidance_scale}
    if "labels" in result:  # the setting, and the class each image went to (as the npz's arr_1)
        given = cfg.class_labels
        report.update(class_labels=OmegaConf.to_container(given) if OmegaConf.is_list(given) else given,
                      labels=result["labels"].tolist())
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
        if "bicubic" in result:  # superres from a split: the baseline's error on the same originals
            report["bicubic_mse_per_dim"] = mse_per_dim(result["bicubic"], result["inputs"])
    return report


def edit(cfg: DictConfig) -> dict[str, Any]:
    """Run the job; returns the report written to ``<task>.json`` (with the output paths)."""
    retain_freed_memory()  # glibc keeps freed host memory for the next batch (utils/host_memory.py)
    loaded, sampler, device = prepare(cfg)
    inputs = read_inputs(cfg, loaded)
    labels = target_labels(cfg, loaded, inputs)
    if cfg.task == "inpaint":
        inputs["mask"] = read_mask(cfg, loaded.image_shape)
    require_writable_dir("output_dir", cfg.output_dir)
    total = len(inputs.get("low_res", inputs.get("images", ())))
    if cfg.task == "interpolate":
        total = cfg.interpolation.num_pairs if not inputs else total // 2
    with folder_lock(cfg.output_dir):
        remove_stale_temporaries(os.path.expanduser(cfg.output_dir))
        with images_progress(total, 0, cfg.task, enabled=cfg.progress) as advance:
            job = EditJob(cfg, loaded, sampler, device, advance)
            with torch.inference_mode():
                result = TASK_RUNS[cfg.task](job, inputs, labels)
        if labels is not None:  # per image: interpolate's row class for each of its images
            per_row = cfg.task == "interpolate"
            result["labels"] = labels.repeat_interleave(cfg.interpolation.num_images) if per_row else labels
        report = edit_report(cfg, loaded, sampler, result)
        report.update(write_outputs(cfg, result, report))
    log.info("%s: wrote %s, %s and %s", cfg.task, report["npz"], report["grid"], report["json"])
    return report


def prepare(cfg: DictConfig) -> tuple[LoadedCheckpoint, DDIMSampler | DDPMSampler, torch.device]:
    """Check every setting, load the checkpoint and build the sampler, before anything is written."""
    check_edit_settings(cfg)
    device = torch.device(resolve_devices(cfg.device, 1)[0])
    sampler = build_sampler(cfg.sampler)
    check_ddim_sampler(sampler, cfg)
    loaded = load_chosen_weights(cfg)
    check_sampler(sampler, cfg.sampler, loaded, null_label(loaded))  # guidance needs a null class
    check_class_labels(cfg, loaded)
    size = low_res_size(loaded)
    if size is not None and cfg.task != "superres":
        raise ConfigError(f"{cfg.ckpt} is a super-resolution model ({size}x{size} -> {loaded.image_shape[-1]}x"
                          f"{loaded.image_shape[-1]}): pass task=superres")
    if size is None and cfg.task == "superres":
        raise ConfigError(f"task=superres needs a super-resolution checkpoint; {cfg.ckpt} is not one")
    return loaded, sampler, device
