"""The tasks of edit.py (`diffusion.jobs.edit`), each from checked inputs to a result dict.

Every task takes the job, the inputs of `diffusion.jobs.edit.read_inputs` and the target
classes (one per input image, per row for interpolate; None for an unconditional
checkpoint), and returns tensors on the CPU: ``outputs`` (or ``latents``), ``inputs`` where
there is something to compare with, and what its grid and npz show beside them. Batch i
draws its randomness from the generator seeded with ``(seed, i)``, as in sample.py.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from diffusion.checkpoint import LoadedCheckpoint
from diffusion.jobs.common import autocast_network, batch_generator
from diffusion.jobs.sample import draw_batch, null_label
from diffusion.process._tensor import randn
from diffusion.sampling.ddim import DDIMSampler
from diffusion.sampling.ddpm import DDPMSampler
from diffusion.sampling.guidance import NULL_LABEL_KEY
from diffusion.sampling.inversion import ddim_invert, sdedit, slerp_row
from diffusion.sampling.repaint import builtin_mask, repaint
from diffusion.utils.errors import ConfigError

Labels = torch.Tensor | None


class EditJob:
    """What every task needs: the checkpoint's process and model, the sampler, a device."""

    def __init__(self, cfg: DictConfig, loaded: LoadedCheckpoint, sampler: DDIMSampler | DDPMSampler, device: torch.device,
                 advance):
        self.cfg, self.loaded, self.sampler, self.device, self.advance = cfg, loaded, sampler, device, advance
        self.model = autocast_network(loaded.model.to(device), device, cfg.precision)

    def batches(self, images: torch.Tensor, labels: Labels):
        """(index, images, labels) per batch of ``batch_size``, on the device."""
        for index, start in enumerate(range(0, len(images), self.cfg.batch_size)):
            stop = start + self.cfg.batch_size
            yield index, images[start:stop].to(self.device), None if labels is None else labels[start:stop].to(self.device)

    def model_kwargs(self, labels: Labels) -> dict | None:
        """The labels as ``y``, with the null label beside them for guidance (as sample.py)."""
        return None if labels is None else {"y": labels, NULL_LABEL_KEY: null_label(self.loaded)}

    def invert(self, x: torch.Tensor, labels: Labels) -> torch.Tensor:
        return ddim_invert(self.loaded.diffusion, self.model, x, self.sampler, clip_denoised=self.cfg.clip_denoised,
                           model_kwargs=self.model_kwargs(labels))

    def decode(self, z: torch.Tensor, labels: Labels, generator=None) -> torch.Tensor:
        return self.sampler(self.loaded.diffusion, self.model, noise=z, clip_denoised=self.cfg.clip_denoised,
                            model_kwargs=self.model_kwargs(labels), generator=generator)


def run_encode(job: EditJob, inputs: dict, labels: Labels, decode: bool) -> dict[str, Any]:
    """DDIM inversion of each image with its class; reconstruct also decodes with that class."""
    latents, outputs = [], []
    for _, x, y in job.batches(inputs["images"], labels):
        z = job.invert(x, y)
        latents.append(z.float().cpu())
        if decode:
            outputs.append(job.decode(z, y).float().cpu())
        job.advance(len(x))
    result = {"latents": torch.cat(latents), "inputs": inputs["images"]}
    if decode:
        result["outputs"] = torch.cat(outputs)
    return result


def run_sdedit(job: EditJob, inputs: dict, labels: Labels) -> dict[str, Any]:
    """SDEdit towards each image's target class."""
    outputs = []
    for index, x, y in job.batches(inputs["images"], labels):
        generator = batch_generator(job.cfg.seed, index, job.device)
        noise = randn(tuple(x.shape), generator, dtype=x.dtype, device=job.device)
        outputs.append(sdedit(job.loaded.diffusion, job.model, x, float(job.cfg.strength), job.sampler, noise=noise,
                              clip_denoised=job.cfg.clip_denoised, model_kwargs=job.model_kwargs(y),
                              generator=generator).float().cpu())
        job.advance(len(x))
    return {"inputs": inputs["images"], "outputs": torch.cat(outputs)}


def run_inpaint(job: EditJob, inputs: dict, labels: Labels) -> dict[str, Any]:
    """RePaint per batch; batch i draws its strokes (mask=strokes), x_T and every step's
    noise from the generator seeded with (seed, i)."""
    settings, mask, masks, outputs = job.cfg.inpaint, inputs.get("mask"), [], []
    for index, x, y in job.batches(inputs["images"], labels):
        generator = batch_generator(job.cfg.seed, index, job.device)
        if mask is None:
            batch_mask = builtin_mask(str(settings.mask), x.shape[2], x.shape[3], len(x), generator)
        else:
            batch_mask = mask.expand(len(x), 1, *mask.shape[2:])
        outputs.append(repaint(job.loaded.diffusion, job.model, x, batch_mask.to(job.device), job.sampler,
                               jump_length=settings.jump_length, jump_n_sample=settings.jump_n_sample,
                               clip_denoised=job.cfg.clip_denoised, model_kwargs=job.model_kwargs(y),
                               generator=generator).float().cpu())
        masks.append(batch_mask.cpu())
        job.advance(len(x))
    masks = torch.cat(masks)
    return {"inputs": inputs["images"], "outputs": torch.cat(outputs), "masks": masks, "masked": inputs["images"] * masks}


def run_interpolate(job: EditJob, inputs: dict, labels: Labels) -> dict[str, Any]:
    """A row of ``interpolation.num_images`` per pair, all of the row's class: pair i is
    images (2i, 2i+1), or two noises drawn from the generator seeded with (seed, i)."""
    settings, images = job.cfg.interpolation, inputs.get("images")
    if images is not None:
        if len(images) < 2:
            raise ConfigError("task=interpolate needs at least 2 input images (pairs of consecutive images); "
                              "pass more, or interpolation.source=seeds")
        pairs = images[: len(images) // 2 * 2]
        both = None if labels is None else labels.repeat_interleave(2)  # (P,) -> (2P,): both ends of a row
        ends = torch.cat([job.invert(x, y) for _, x, y in job.batches(pairs, both)])
        ends = ends.view(-1, 2, *images.shape[1:])  # (2P, C, H, W) -> (P, 2, C, H, W)
    else:
        shape = (2, *job.loaded.image_shape)
        ends = torch.stack([randn(shape, batch_generator(job.cfg.seed, i, job.device), device=job.device)
                            for i in range(settings.num_pairs)])
    rows = []
    for row, (z0, z1) in enumerate(ends):
        y = None if labels is None else labels[row].expand(settings.num_images).to(job.device)  # () -> (n,)
        rows.append(job.decode(slerp_row(z0, z1, settings.num_images), y).float().cpu())
        job.advance(1)
    return {"outputs": torch.cat(rows), "nrow": settings.num_images}


def run_superres(job: EditJob, inputs: dict, labels: Labels) -> dict[str, Any]:
    """A super-resolution checkpoint's outputs for the low-resolution inputs, batch i drawn
    exactly as sample.py draws its batch i (`draw_batch`, the generator (seed, i)), with the
    bicubic upsampling of each input for comparison and, from a split, the originals."""
    low_res, outputs = inputs["low_res"], []
    for index, low, y in job.batches(low_res, labels):
        generator = batch_generator(job.cfg.seed, index, job.device)
        outputs.append(draw_batch(job.cfg, job.loaded, job.sampler, generator, len(low), job.device, y,
                                  low).float().cpu())
        job.advance(len(low))
    outputs = torch.cat(outputs)
    bicubic = F.interpolate(low_res, size=outputs.shape[2:], mode="bicubic", align_corners=False).clamp(-1, 1)
    result = {"outputs": outputs, "bicubic": bicubic, "low_res": low_res}
    if "images" in inputs:  # a split's pairs: the high-resolution originals to compare with
        result["inputs"] = inputs["images"]
    return result


TASK_RUNS = {
    "encode": lambda job, inputs, labels: run_encode(job, inputs, labels, decode=False),
    "reconstruct": lambda job, inputs, labels: run_encode(job, inputs, labels, decode=True),
    "interpolate": run_interpolate,
    "sdedit": run_sdedit,
    "inpaint": run_inpaint,
    "superres": run_superres,
}
