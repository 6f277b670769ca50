"""The sampler interface shared by every sampler (after crowsonkb/k-diffusion).

A sampler is a small value object (its settings) that is called with the BASE process a
model was trained with, as stored in the checkpoint::

    x0 = sampler(diffusion, model, shape=(16, 3, 32, 32), generator=g)

It decides which of the T original steps it visits (``timesteps(T)``), builds the
respaced process over them once per base process (``respaced(diffusion)``, improved-
diffusion's ``SpacedDiffusion``), and runs that process's sampling loop. All randomness,
the starting noise included, comes from ``generator``, so one seed gives one set of images.

Every sampler also takes ``guidance_scale`` (classifier-free guidance, Ho & Salimans 2022;
see ``diffusion.sampling.guidance``), applied here by wrapping the model, so subclasses and
their configs get it without code of their own: ``sample.py sampler.guidance_scale=3``.
A guided call passes the model's null label as ``model_kwargs["null_label"]`` beside the
labels ``"y"``; the sampler removes that key before the model is called.
"""

from __future__ import annotations

import abc
import dataclasses
import weakref
from collections.abc import Callable, Sequence

import torch

from diffusion.process._tensor import model_device, model_dtype, randn
from diffusion.process.respace import SpacedDiffusion, respace
from diffusion.sampling.guidance import apply_guidance, check_guidance_scale


def _infer_device_dtype(model, generator) -> tuple[torch.device, torch.dtype]:
    """Where and in what float type x_T is made: the model's device and float type; for a
    model without tensors (a closure, an analytic model) the generator's device (else the
    CPU) and the default float type."""
    device = model_device(model)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    return device, model_dtype(model) or torch.get_default_dtype()


def _check_base_process(diffusion) -> None:
    """A sampler respaces the process itself, so it needs the un-respaced one. A
    SpacedDiffusion that keeps every step (improved-diffusion's factory returns one even
    without respacing) is the base process in disguise and is accepted."""
    if isinstance(diffusion, SpacedDiffusion):
        if len(diffusion.timestep_map) != diffusion.original_num_steps:
            raise ValueError(
                f"samplers take the base process; got a SpacedDiffusion that keeps "
                f"{len(diffusion.timestep_map)} of {diffusion.original_num_steps} steps. "
                f"Pass the checkpoint's GaussianDiffusion and choose the steps with the "
                f"sampler's steps/respacing instead"
            )


@dataclasses.dataclass
class Sampler(abc.ABC):
    """Base class: subclasses are dataclasses whose fields are their constructor keywords
    (so ``configs/sampler/*.yaml`` instantiate them) and implement ``timesteps`` and
    ``_run_loop``; they inherit ``__call__`` (which applies the guidance).

    Args:
        guidance_scale: classifier-free guidance weight w (keyword-only, on every sampler):
            None (default) or 1 samples the model as it is called; 0 samples the
            unconditional model (null labels); w > 1 guides with out_u + w (out_c − out_u),
            both halves from one forward pass on the doubled batch. Anything but None / 1
            needs labels ``"y"`` and ``"null_label"`` in ``model_kwargs``.
    """

    guidance_scale: float | None = dataclasses.field(default=None, kw_only=True)
    _cache: dict = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @abc.abstractmethod
    def timesteps(self, num_timesteps: int) -> list[int]:
        """The original step indices (ascending) this sampler visits in a T-step process."""

    @abc.abstractmethod
    def _run_loop(self, process, model, noise, **loop_kwargs) -> torch.Tensor:
        """Run the respaced process's loop from ``noise``."""

    def num_function_evals(self, num_timesteps: int) -> int:
        """Model calls for one batch of samples: one per visited step (for NFE plots)."""
        return len(self.timesteps(num_timesteps))

    def check(self, diffusion) -> None:
        """Raise ValueError now if this sampler cannot run on ``diffusion`` (a respaced
        process, more steps than it has, a step rule without an exact answer, a guidance
        scale that is not a number)."""
        check_guidance_scale(self.guidance_scale)
        self.respaced(diffusion)

    def respaced(self, diffusion):
        """The process over ``timesteps(T)``, built once per base process and cached.

        When every step is kept the base process itself is returned, so that ``ddpm`` is
        exactly ``diffusion.p_sample_loop``.
        """
        _check_base_process(diffusion)
        entry = self._cache.get(id(diffusion))
        if entry is not None and entry[0]() is diffusion:
            return entry[1]
        use_timesteps = self.timesteps(diffusion.num_timesteps)
        if len(use_timesteps) == diffusion.num_timesteps:
            process = diffusion
        else:
            process = respace(diffusion, use_timesteps)
        self._cache = {k: v for k, v in self._cache.items() if v[0]() is not None}
        self._cache[id(diffusion)] = (weakref.ref(diffusion), process)
        return process

    def __call__(
        self,
        diffusion,
        model,
        *,
        shape: Sequence[int] | None = None,
        noise: torch.Tensor | None = None,
        model_kwargs: dict | None = None,
        clip_denoised: bool = True,
        generator: torch.Generator | None = None,
        progress: bool | Callable = False,
    ) -> torch.Tensor:
        """Draw samples x_0 of ``shape`` (N, C, H, W), or start from the given x_T ``noise``.

        The starting noise is drawn from ``generator`` and placed on the model's device in
        its float type (for a model without parameters, e.g. a closure: the generator's
        device and the default float type); pass ``noise`` to choose either. The per-step
        noise also comes from ``generator``, which must live on the model's device.
        ``progress``: True for a tqdm bar, or a callable wrapping the step iterable.
        ``model_kwargs``: ``"y"`` labels, and for guidance the ``"null_label"`` index (never
        passed on to the model). Returns x_0 in the model's data scale ([-1, 1] for images).
        """
        process = self.respaced(diffusion)
        noise = self._initial_noise(model, shape, noise, generator)  # before wrapping: its device
        model, model_kwargs = apply_guidance(model, model_kwargs, self.guidance_scale)
        return self._run_loop(
            process,
            model,
            noise,
            clip_denoised=clip_denoised,
            model_kwargs=model_kwargs,
            device=noise.device,
            progress=progress,
            generator=generator,
        )

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = {}  # weak references cannot be pickled; the cache rebuilds
        return state

    @staticmethod
    def _initial_noise(model, shape, noise, generator) -> torch.Tensor:
        """x_T ~ N(0, I): given, or drawn from ``generator``."""
        if (shape is None) == (noise is None):
            raise ValueError(
                f"pass exactly one of shape and noise (got shape={shape!r}, "
                f"noise={'None' if noise is None else tuple(noise.shape)})"
            )
        if noise is not None:
            return noise
        device, dtype = _infer_device_dtype(model, generator)
        return randn(shape, generator, dtype=dtype, device=device)
