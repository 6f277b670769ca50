"""Negative log-likelihood bound in bits per dimension over a dataset.

The variational bound of DDPM eq. 5 (arXiv 2006.11239), as IDDPM reports it (sec. 2.1,
Table 1-2, arXiv 2102.09672):

    L_vlb = L_0 + L_1 + ... + L_{T-1} + L_T,

L_T = KL(q(x_T|x_0) || N(0, I)) the prior term, L_0 = −log p_θ(x_0|x_1) the discretized
decoder term on 8-bit data, and the rest KL(q(x_{t-1}|x_t, x_0) || p_θ(x_{t-1}|x_t)). Every
term is averaged over the pixels and divided by log 2, so the sum is in bits per dimension.
Each KL term is a one-sample Monte-Carlo estimate (one x_t per image and t), computed by the
process's ``calc_bpd_loop``; we average it over the images.

Respaced bound: with ``respacing`` the same model is evaluated as a K-step process (the
kept steps of improved-diffusion's ``SpacedDiffusion``). That is the exact bound of a
different, shorter latent-variable model, hence still an upper bound on that model's NLL,
but in general a LOOSER bound than the full T-step one (IDDPM sec. 4 / Fig. 8 show the NLL
degrading as steps are skipped). Report it as such, never as the model's bits/dim.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from diffusion.process._tensor import model_device
from diffusion.process.respace import respace, space_timesteps


def respace_process(diffusion, respacing: str):
    """``diffusion`` restricted to the steps of ``space_timesteps(T, respacing)``, with
    every other setting kept (``process.respace.respace``)."""
    return respace(diffusion, space_timesteps(diffusion.num_timesteps, respacing))


class _Sums:
    """Running float64 sums over images of every term of the bound."""

    def __init__(self):
        self.num_images = 0
        self.totals: dict[str, torch.Tensor] = {}

    def add(self, out: dict[str, torch.Tensor]) -> None:
        terms = {
            "bpd": out["total_bpd"],  # (B,)
            "prior_bpd": out["prior_bpd"],  # (B,)
            # calc_bpd_loop's column 0 is t = T-1; flip so that column i is step i.
            "vb_terms_bpd": out["vb"].flip(1),  # (B, T)
            "xstart_mse": out["xstart_mse"].flip(1),  # (B, T)
            "mse": out["mse"].flip(1),  # (B, T)
        }
        for key, value in terms.items():
            value = value.detach().to("cpu", torch.float64).sum(dim=0)
            self.totals[key] = self.totals[key] + value if key in self.totals else value
        self.num_images += int(out["total_bpd"].shape[0])

    def result(self, timesteps: list[int]) -> dict:
        if self.num_images == 0:
            raise ValueError("evaluate_bpd got no images (empty batches or max_batches=0)")
        n = self.num_images
        out = {key: _plain(value / n) for key, value in self.totals.items()}
        out["decoder_bpd"] = out["vb_terms_bpd"][0]
        out.update({f"{key}_sum": _plain(value) for key, value in self.totals.items()})
        out["decoder_bpd_sum"] = out["vb_terms_bpd_sum"][0]
        out["num_images"] = n
        out["timesteps"] = timesteps
        return out


def _plain(value: torch.Tensor):
    return value.item() if value.ndim == 0 else value.tolist()


def evaluate_bpd(
    diffusion,
    model,
    batches: Iterable,
    *,
    clip_denoised: bool = True,
    model_kwargs_fn: Callable[[torch.Tensor], dict] | None = None,
    progress: Callable[[int], None] | None = None,
    max_batches: int | None = None,
    respacing: str | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """The variational bound in bits/dim, averaged over the images of ``batches``.

    Args:
        diffusion: the base process (a GaussianDiffusion over all T steps).
        model: called as ``model(x_t, t, **model_kwargs)``.
        batches: iterable of ``(images, labels)`` (or bare image tensors), images NCHW in
            [-1, 1] (8-bit data scaled as the DataModules do).
        model_kwargs_fn: ``labels -> model_kwargs``, e.g. ``lambda y: {"y": y}`` for a
            class-conditional model; None calls the model without kwargs.
        progress: called with the number of images after each batch (e.g. to advance a
            ``rich.progress`` task); nothing is printed here.
        max_batches: stop after this many batches.
        respacing: section counts (``"10,15,20"``, ``"ddim50"``) to evaluate the looser
            bound of the respaced process instead (see the module docstring).
        generator: torch.Generator for the x_t noise (drawn where it lives, then moved).
        device: where the batches are moved before the model sees them. Default: the
            model's device if it is an nn.Module with tensors, else the CPU. Pass it
            whenever ``model`` is a closure (an autocast wrapper, a guided model) around a
            network elsewhere: a closure's device cannot be seen.

    Returns:
        plain dict: ``bpd`` (total), ``prior_bpd``, ``decoder_bpd`` (L_0), ``vb_terms_bpd``
        (list, entry i = mean term at original step ``timesteps[i]``, ascending, entry 0 the
        decoder term), ``xstart_mse`` and ``mse`` per step, ``num_images``, ``timesteps``,
        and ``<key>_sum`` for each of those (sums over images, for merging shards).
    """
    process = diffusion if respacing is None else respace_process(diffusion, respacing)
    timesteps = (
        list(range(diffusion.num_timesteps))
        if respacing is None
        else [int(t) for t in process.timestep_map]
    )
    device = torch.device(device if device is not None else model_device(model) or "cpu")
    sums = _Sums()
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        images, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
        images = images.to(device)
        labels = labels.to(device) if isinstance(labels, torch.Tensor) else labels
        model_kwargs = model_kwargs_fn(labels) if model_kwargs_fn is not None else None
        out = process.calc_bpd_loop(
            model, images, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
            generator=generator,
        )
        sums.add(out)
        if progress is not None:
            progress(int(images.shape[0]))
    return sums.result(timesteps)
