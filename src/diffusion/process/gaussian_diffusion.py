"""Gaussian diffusion: forward process, reverse process, losses, DDPM and DDIM sampling.

Numerical conventions follow openai/improved-diffusion (``gaussian_diffusion.py``), so a
model trained there gives the same numbers here: 0-based ``t`` (index 0 holds the first
noising step), float64 schedule constants, the same clipping of the posterior
log-variance and the same T/1000 factor on the hybrid loss's vb term.
Beyond that codebase: the ``"v"`` parameterisation (Salimans & Ho 2022, arXiv 2202.00512,
sec. 4), ``generator=`` on every sampler, validated string/enum choices, the Min-SNR-γ
loss weighting (Hang et al. 2023, arXiv 2303.09556) and schedules with zero terminal SNR,
ᾱ_T = 0 (Lin et al. 2023, arXiv 2305.08891; see ``schedules.rescale_zero_terminal_snr``).

Notation (identifier -> paper symbol, DDPM arXiv 2006.11239 / IDDPM arXiv 2102.09672):

==========================  ===================================================
``betas[t]``                β_{t+1}
``alphas_cumprod[t]``       ᾱ_{t+1} = Π_{s≤t+1} (1 − β_s)
``alphas_cumprod_prev[t]``  ᾱ_t (1 at t = 0)
``posterior_variance[t]``   β̃_{t+1} = β_{t+1}(1 − ᾱ_t)/(1 − ᾱ_{t+1})
``posterior_mean_coef1/2``  the coefficients of x_0 and x_t in μ̃ (DDPM eq. 7)
``pred_xstart``             x̂_0, the model's estimate of x_0
``eps``, ``v``              ε, and v = √ᾱ ε − √(1−ᾱ) x_0 (Salimans & Ho 2022, sec. 4)
``snr``                     SNR_t = ᾱ_t/(1 − ᾱ_t)
==========================  ===================================================
"""

from __future__ import annotations

import enum
import math

import numpy as np
import torch

from diffusion.process._tensor import (
    extract_into_tensor,
    model_device,
    randn,
    randn_like,
    scale_timesteps,
)
from diffusion.process.losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl


class _Choice(str, enum.Enum):
    """A closed set of lower_snake strings; members compare equal to their string."""

    @classmethod
    def parse(cls, value, arg_name: str):
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value in cls._value2member_map_:
            return cls(value)
        raise ValueError(f"invalid {arg_name} {value!r}; choose one of {[m.value for m in cls]}")


class ModelMeanType(_Choice):
    """What the network's (first C) output channels predict."""

    PREVIOUS_X = "previous_x"  # μ̃, the mean of x_{t-1}
    START_X = "start_x"  # x_0
    EPSILON = "epsilon"  # ε
    V = "v"  # v = √ᾱ ε − √(1−ᾱ) x_0; beyond improved-diffusion (Salimans & Ho 2022)


class ModelVarType(_Choice):
    """How the reverse variance Σ_θ is obtained."""

    FIXED_SMALL = "fixed_small"  # β̃_t, the posterior variance
    FIXED_LARGE = "fixed_large"  # β_t (first entry β̃_2, for a better decoder NLL)
    LEARNED = "learned"  # the network outputs log Σ
    LEARNED_RANGE = "learned_range"  # IDDPM eq. 15, network value v ∈ [-1, 1]

    def is_learned(self) -> bool:
        """Whether the network outputs Σ_θ (C more channels, after the mean's C)."""
        return self in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE)


class LossType(_Choice):
    MSE = "mse"  # L_simple (+ unscaled vb when the variance is learned)
    RESCALED_MSE = "rescaled_mse"  # L_hybrid: MSE + vb·T/1000 with the mean frozen
    KL = "kl"  # one term of L_vlb
    RESCALED_KL = "rescaled_kl"  # one term of L_vlb times T: an estimate of the full bound

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


class LossWeighting(_Choice):
    """A per-step weight on the MSE term of the loss (the vb term is never reweighted)."""

    NONE = "none"  # L_simple as in DDPM / improved-diffusion
    MIN_SNR = "min_snr"  # Min-SNR-γ (Hang et al. 2023, arXiv 2303.09556, sec. 3.4)


def min_snr_loss_weights(alphas_cumprod, model_mean_type, gamma: float) -> np.ndarray:
    """Min-SNR-γ weights w_t of the MSE term, float64, shape (T,) (Hang et al. 2023,
    arXiv 2303.09556, sec. 3.4).

    The x_0 loss is weighted by min(SNR_t, γ). The other targets' losses are the x_0 loss of
    the prediction they imply times a factor (x̂_0 − x_0 = −(ε̂ − ε)/√SNR_t = −√(1−ᾱ_t)(v̂ − v)),
    so their weights divide that factor out: ε: min(SNR_t, γ)/SNR_t = min(1, γ/SNR_t) (its
    limit 1 at SNR_t = 0), v: min(SNR_t, γ)/(SNR_t + 1). μ̃ (previous_x) has no such form.
    """
    alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
    snr = alphas_cumprod / (1.0 - alphas_cumprod)  # 1 − ᾱ_t ≥ β_1 > 0
    clipped = np.minimum(snr, gamma)
    with np.errstate(divide="ignore"):  # γ/0 = inf at a zero-SNR step: min(1, inf) = 1
        by_target = {
            ModelMeanType.START_X: lambda: clipped,
            ModelMeanType.EPSILON: lambda: np.minimum(1.0, gamma / snr),
            ModelMeanType.V: lambda: clipped / (snr + 1.0),
        }
        return by_target[model_mean_type]()


def _positive_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _nonzero_mask(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """1 where t > 0 and 0 at t == 0 (no noise on the last reverse step); (B, 1, ..., 1)."""
    return (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


class GaussianDiffusion:
    """Utilities for training and sampling Gaussian diffusion models (DDPM, IDDPM, DDIM).

    :param betas: 1-D array of β_1..β_T, each in (0, 1].
    :param model_mean_type: a ModelMeanType or its string.
    :param model_var_type: a ModelVarType or its string.
    :param loss_type: a LossType or its string.
    :param rescale_timesteps: pass the model float timesteps t·1000/T instead of indices,
        so that it always sees the 0..1000 range of the original paper.
    :param loss_weighting: a LossWeighting or its string: ``"none"`` (the losses of
        improved-diffusion, bit for bit) or ``"min_snr"`` (Min-SNR-γ on the MSE term, for
        the epsilon, start_x and v targets; see ``min_snr_loss_weights``).
    :param min_snr_gamma: γ of Min-SNR-γ (5 in Hang et al.); used with ``"min_snr"`` only.

    Betas whose last entry is 1 give ᾱ_T = 0 (zero terminal SNR, Lin et al. 2023): every
    method stays finite for the start_x, v and previous_x parameterisations; epsilon is
    refused, since x̂_0 = (x_T − √(1−ᾱ_T) ε̂)/√ᾱ_T is undefined there.
    """

    def __init__(
        self,
        *,
        betas,
        model_mean_type,
        model_var_type,
        loss_type,
        rescale_timesteps: bool = False,
        loss_weighting="none",
        min_snr_gamma: float = 5.0,
    ):
        # Every argument, read before any other local exists, so that a copy of this process
        # over other steps (respace.respace) keeps them all, including any added later.
        init_kwargs = {name: value for name, value in locals().items() if name != "self"}
        self.model_mean_type = ModelMeanType.parse(model_mean_type, "model_mean_type")
        self.model_var_type = ModelVarType.parse(model_var_type, "model_var_type")
        self.loss_type = LossType.parse(loss_type, "loss_type")
        self.loss_weighting = LossWeighting.parse(loss_weighting, "loss_weighting")
        self.rescale_timesteps = bool(rescale_timesteps)

        betas = np.array(betas, dtype=np.float64)  # float64 for accuracy, computed once
        if betas.ndim != 1 or betas.size == 0 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError(f"betas must be a non-empty 1-D array in (0, 1], got {betas!r}")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        # q(x_t | x_0), DDPM eq. 4
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        # inf where ᾱ_t = 0; only the epsilon parameterisation reads them, and it is refused
        # there (_check_zero_terminal_snr)
        with np.errstate(divide="ignore"):
            self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
            self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # q(x_{t-1} | x_t, x_0), DDPM eqs. 6-7
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # β̃ is 0 at t = 0, so its log is clipped to β̃ at t = 1. (A one-step process has no
        # second entry; improved-diffusion fails there, we fall back to β.)
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        # fixed_large: β_t, but β̃ at t = 0 for a better decoder likelihood (DDPM sec. 3.2)
        self.fixed_large_variance = np.append(first, betas[1:])
        self.log_betas = np.log(betas)
        self.zero_terminal_snr = bool(self.alphas_cumprod[-1] == 0.0)
        self._check_zero_terminal_snr()
        self.min_snr_gamma = _positive_float(min_snr_gamma, "min_snr_gamma")
        self.mse_loss_weights = self._mse_loss_weights()
        self._init_kwargs = {**init_kwargs, "betas": self.betas}  # the validated float64 copy

    @property
    def init_kwargs(self) -> dict:
        """The keyword arguments this process was built with (betas as its float64 copy):
        ``GaussianDiffusion(**d.init_kwargs)`` rebuilds it with every setting."""
        return dict(self._init_kwargs)

    def _check_zero_terminal_snr(self) -> None:
        if self.zero_terminal_snr and self.model_mean_type == ModelMeanType.EPSILON:
            raise ValueError(
                "model_mean_type='epsilon' is ill-posed with zero terminal SNR (ᾱ_T = 0: x_T "
                "holds no trace of x_0, and x̂_0 = (x_T − ε̂)/√ᾱ_T divides by 0); use "
                "model_mean_type=v (Lin et al. 2023, arXiv 2305.08891, sec. 3.2) or start_x, "
                "or a schedule with zero_terminal_snr=false"
            )

    def _mse_loss_weights(self) -> np.ndarray | None:
        """The per-step weights of the MSE term (T,), or None for ``loss_weighting="none"``."""
        if self.loss_weighting == LossWeighting.NONE:
            return None
        if self.loss_type.is_vb() or self.model_mean_type == ModelMeanType.PREVIOUS_X:
            raise ValueError(
                f"loss_weighting='min_snr' weights the MSE of an epsilon, start_x or v target; "
                f"got model_mean_type={self.model_mean_type.value!r} with "
                f"loss_type={self.loss_type.value!r}. Use model_mean_type one of "
                f"['epsilon', 'start_x', 'v'] with loss_type one of ['mse', 'rescaled_mse'], "
                f"or loss_weighting='none'"
            )
        return min_snr_loss_weights(self.alphas_cumprod, self.model_mean_type, self.min_snr_gamma)

    # ----------------------------------------------------------------- forward process
    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0) = N(√ᾱ_t x_0, (1−ᾱ_t) I), DDPM eq. 4."""
        mean = extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start)
        log_variance = extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start)
        return mean, variance.expand_as(x_start), log_variance.expand_as(x_start)

    def q_sample(self, x_start, t, noise=None):
        """Sample x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (DDPM eq. 4); ``noise`` is ε (default: fresh)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(
                f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}"
            )
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0), DDPM eqs. 6-7."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start {tuple(x_start.shape)} and x_t {tuple(x_t.shape)} differ")
        mean = (
            extract_into_tensor(self.posterior_mean_coef1, t, x_t) * x_start
            + extract_into_tensor(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = extract_into_tensor(self.posterior_variance, t, x_t)
        log_variance = extract_into_tensor(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance.expand_as(x_t), log_variance.expand_as(x_t)

    # ------------------------------------------------- conversions between parameterisations
    def _predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 = (x_t − √(1−ᾱ) ε)/√ᾱ, DDPM eq. 4 solved for x_0."""
        return (
            extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """ε = (x_t/√ᾱ − x_0)/√(1/ᾱ − 1) (improved-diffusion's form), or with zero terminal
        SNR the same ε = (x_t − √ᾱ x_0)/√(1−ᾱ), which stays finite at ᾱ = 0 (ε = x_T)."""
        if self.zero_terminal_snr:
            return (
                x_t - extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t) * pred_xstart
            ) / extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        return (
            extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart
        ) / extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        """x_0 = (μ̃ − coef2·x_t)/coef1, DDPM eq. 7 solved for x_0."""
        return (
            extract_into_tensor(1.0 / self.posterior_mean_coef1, t, x_t) * xprev
            - extract_into_tensor(self.posterior_mean_coef2 / self.posterior_mean_coef1, t, x_t)
            * x_t
        )

    def _predict_xstart_from_v(self, x_t, t, v):
        """x_0 = √ᾱ x_t − √(1−ᾱ) v (Salimans & Ho 2022, arXiv 2202.00512, sec. 4)."""
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t) * x_t
            - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v
        )

    def _predict_eps_from_v(self, x_t, t, v):
        """ε = √(1−ᾱ) x_t + √ᾱ v (Salimans & Ho 2022, sec. 4)."""
        return (
            extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
            + extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t) * v
        )

    def get_v(self, x_start, noise, t):
        """v = √ᾱ ε − √(1−ᾱ) x_0, the v-prediction target (Salimans & Ho 2022, sec. 4)."""
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start) * noise
            - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start
        )

    def _scale_timesteps(self, t):
        return scale_timesteps(t, self.num_timesteps, self.rescale_timesteps)

    def model_timesteps(self, t):
        """The timesteps the network receives for process indices ``t`` (for samplers that
        call the model themselves): ``t``, or t·1000/T with ``rescale_timesteps``."""
        return self._scale_timesteps(t)

    # --------------------------------------------------------------------- reverse process
    def _model_variance(self, var_values, x, t):
        """(Σ_θ, log Σ_θ) for the configured variance type, each of x's shape."""
        kind = self.model_var_type
        if kind == ModelVarType.LEARNED:
            return torch.exp(var_values), var_values
        if kind == ModelVarType.LEARNED_RANGE:
            # IDDPM eq. 15: interpolate log β̃_t (v = −1) and log β_t (v = +1) in log space.
            min_log = extract_into_tensor(self.posterior_log_variance_clipped, t, x)
            max_log = extract_into_tensor(self.log_betas, t, x)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            return torch.exp(log_variance), log_variance
        variance, log_variance = {
            ModelVarType.FIXED_SMALL: (
                self.posterior_variance,
                self.posterior_log_variance_clipped,
            ),
            ModelVarType.FIXED_LARGE: (
                self.fixed_large_variance,
                np.log(self.fixed_large_variance),
            ),
        }[kind]
        return (
            extract_into_tensor(variance, t, x).expand_as(x),
            extract_into_tensor(log_variance, t, x).expand_as(x),
        )

    def _pred_xstart_from_output(self, mean_out, x, t):
        """x̂_0 from the mean channels, for each ModelMeanType."""
        convert = {
            ModelMeanType.EPSILON: self._predict_xstart_from_eps,
            ModelMeanType.START_X: lambda x_t, t, out: out,
            ModelMeanType.PREVIOUS_X: self._predict_xstart_from_xprev,
            ModelMeanType.V: self._predict_xstart_from_v,
        }[self.model_mean_type]
        return convert(x, t, mean_out)

    def model_output_channels(self, in_channels: int) -> int:
        """The network's output width for ``in_channels`` data channels: 2C for learned
        variances (the mean's C channels first, then Σ_θ's; IDDPM sec. 3.1), else C."""
        return 2 * in_channels if self.model_var_type.is_learned() else in_channels

    def _check_output_shape(self, model_output, x):
        """The model must return ``model_output_channels(C)`` channels (CONTRACTS.md)."""
        B, C = x.shape[:2]
        want = (B, self.model_output_channels(C), *x.shape[2:])
        if tuple(model_output.shape) != want:
            raise ValueError(
                f"model output has shape {tuple(model_output.shape)}, expected {want} for "
                f"model_var_type={self.model_var_type.value!r}"
            )

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Apply the model to get p_θ(x_{t-1} | x_t) and x̂_0 (DDPM eq. 1, IDDPM sec. 3.1).

        :param x: x_t, shape (B, C, ...); ``t``: int64 (B,).
        :param clip_denoised: clamp x̂_0 to [-1, 1] (after ``denoised_fn``, if given).
        :return: dict with ``mean``, ``variance``, ``log_variance``, ``pred_xstart``, all (B, C, ...).
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        C = x.shape[1]
        model_output = model(x, self._scale_timesteps(t), **model_kwargs)
        self._check_output_shape(model_output, x)
        var_values = None
        if self.model_var_type.is_learned():
            # (B, 2C, ...) -> 2 x (B, C, ...): mean part first, variance part second
            model_output, var_values = model_output.split(C, dim=1)
        variance, log_variance = self._model_variance(var_values, x, t)

        pred_xstart = self._pred_xstart_from_output(model_output, x, t)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            mean = model_output  # the network predicts μ̃ directly
        else:
            mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
        }

    def p_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, generator=None
    ):
        """Ancestral step x_{t-1} = μ_θ + σ_θ z (DDPM Algorithm 2); no noise at t = 0.

        :return: dict with ``sample`` and ``pred_xstart``.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        noise = randn_like(x, generator)
        sample = out["mean"] + _nonzero_mask(t, x) * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        generator=None,
    ):
        """Draw samples with T ancestral steps; returns the final x_0 of shape ``shape``.

        :param noise: x_T (default: drawn from ``generator``).
        :param progress: True for a tqdm bar, or a callable wrapping the step iterable.
        :param generator: torch.Generator for the initial and all per-step noise.
        """
        final = None
        for out in self.p_sample_loop_progressive(
            model,
            shape,
            noise,
            clip_denoised,
            denoised_fn,
            model_kwargs,
            device,
            progress,
            generator=generator,
        ):
            final = out
        return final["sample"]

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        generator=None,
    ):
        """Like p_sample_loop, but yield p_sample's dict after every step."""
        yield from self._loop(
            self.p_sample,
            model,
            shape,
            noise,
            device,
            progress,
            generator,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )

    def ddim_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        eta=0.0,
        generator=None,
    ):
        """One DDIM step x_t -> x_{t-1} (DDIM eq. 12, arXiv 2010.02502), σ from eq. 16 times η.

        x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1 − ᾱ_{t-1} − σ²) ε̂ + σ z, with ε̂ re-derived from x̂_0
        so that every mean type works. η = 0 is deterministic, η = 1 is DDPM-like.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = extract_into_tensor(self.alphas_cumprod, t, x)
        alpha_bar_prev = extract_into_tensor(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt(
            (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
        )
        # clamp: for η ≤ 1 this is ≥ 0 in exact arithmetic; rounding must not make sqrt NaN.
        eps_coef = torch.sqrt((1 - alpha_bar_prev - sigma**2).clamp(min=0))
        sample = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + eps_coef * eps
        if eta != 0:
            sample = sample + _nonzero_mask(t, x) * sigma * randn_like(x, generator)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0
    ):
        """Deterministic DDIM inversion step x_t -> x_{t+1} (DDIM eq. 12 run forward, η = 0)."""
        if eta != 0.0:
            raise ValueError(
                f"ddim_reverse_sample needs eta=0.0 (the ODE is deterministic), got {eta!r}"
            )
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = extract_into_tensor(self.alphas_cumprod_next, t, x)
        sample = (
            out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        )
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        generator=None,
    ):
        """Draw samples with DDIM over all T steps of this process (respace it for fewer)."""
        final = None
        for out in self.ddim_sample_loop_progressive(
            model,
            shape,
            noise,
            clip_denoised,
            denoised_fn,
            model_kwargs,
            device,
            progress,
            eta=eta,
            generator=generator,
        ):
            final = out
        return final["sample"]

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
        generator=None,
    ):
        """Like ddim_sample_loop, but yield ddim_sample's dict after every step."""
        yield from self._loop(
            self.ddim_sample,
            model,
            shape,
            noise,
            device,
            progress,
            generator,
            clip_denoised=clip_denoised,
            denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
            eta=eta,
        )

    def _loop(self, step, model, shape, noise, device, progress, generator, **step_kwargs):
        """Run ``step`` from t = T−1 down to 0, yielding each step's output dict."""
        if not isinstance(shape, (tuple, list)):
            raise ValueError(f"shape must be a tuple or list, got {shape!r}")
        device = _infer_device(model, noise, device, generator)
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} != shape {tuple(shape)}")
            img = noise.to(device)
        else:
            img = randn(shape, generator, device=device)
        indices = range(self.num_timesteps - 1, -1, -1)
        if callable(progress):
            indices = progress(indices)
        elif progress:
            from tqdm.auto import tqdm  # lazy: tqdm is optional

            indices = tqdm(indices)
        for i in indices:
            t = torch.full((shape[0],), i, dtype=torch.long, device=device)
            with torch.no_grad():
                out = step(model, img, t, generator=generator, **step_kwargs)
            yield out
            img = out["sample"]

    # ---------------------------------------------------------------------------- losses
    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One term of L_vlb in bits per dimension (DDPM eq. 5, IDDPM eqs. 4-6).

        L_{t} = KL(q(x_{t-1}|x_t,x_0) || p_θ(x_{t-1}|x_t)) for t > 0 and the discretized
        decoder NLL −log p_θ(x_0|x_1) at t = 0; each averaged over pixels, divided by log 2.

        :return: dict with ``output`` (B,) and ``pred_xstart``.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(
            model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
        )
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def _mse_target(self, x_start, x_t, t, noise):
        """What the mean channels regress onto, for each ModelMeanType."""
        return {
            ModelMeanType.PREVIOUS_X: lambda: self.q_posterior_mean_variance(x_start, x_t, t)[0],
            ModelMeanType.START_X: lambda: x_start,
            ModelMeanType.EPSILON: lambda: noise,
            ModelMeanType.V: lambda: self.get_v(x_start, noise, t),
        }[self.model_mean_type]()

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-example losses at timesteps ``t`` (one term of the objective per example).

        :return: dict of (B,) tensors: ``loss``, plus ``mse`` (weighted by ``loss_weighting``)
            and ``vb`` where they apply; always ``loss == mse + vb`` with absent terms
            counting as 0.
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        if self.loss_type.is_vb():
            vb = self._vb_terms_bpd(
                model, x_start, x_t, t, clip_denoised=False, model_kwargs=model_kwargs
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                vb = vb * self.num_timesteps  # one uniform term times T estimates the whole sum
            return {"loss": vb, "vb": vb}

        model_output = model(x_t, self._scale_timesteps(t), **model_kwargs)
        self._check_output_shape(model_output, x_t)
        terms = {}
        if self.model_var_type.is_learned():
            C = x_t.shape[1]
            # (B, 2C, ...) -> 2 x (B, C, ...): mean part first, variance part second
            model_output, var_values = model_output.split(C, dim=1)
            # IDDPM sec. 3.1: Σ_θ learns from L_vlb while the mean is frozen, so L_simple
            # alone drives the mean (stop-gradient on the mean channels).
            frozen = torch.cat([model_output.detach(), var_values], dim=1)  # (B, 2C, ...)
            frozen_model = lambda *_, **__: frozen  # noqa: E731
            vb = self._vb_terms_bpd(frozen_model, x_start, x_t, t, clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # IDDPM eq. 16: λ·L_vlb with λ = 0.001, and L_vlb ≈ T·L_t for a uniform t,
                # so the one-term estimate is scaled by λ·T = T/1000.
                vb = vb * (self.num_timesteps / 1000.0)
            terms["vb"] = vb
        target = self._mse_target(x_start, x_t, t, noise)
        terms["mse"] = mean_flat((target - model_output) ** 2)
        if self.mse_loss_weights is not None:
            # Min-SNR-γ: w_t on the MSE term only (Hang et al. 2023, sec. 3.4)
            terms["mse"] = terms["mse"] * extract_into_tensor(
                self.mse_loss_weights, t, terms["mse"]
            )
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, shape (B,); L_T of DDPM eq. 5."""
        t = torch.full(
            (x_start.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x_start.device
        )
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / math.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None, generator=None):
        """The full variational bound in bits per dimension, L_0 + ... + L_T (DDPM eq. 5).

        :param generator: the source of the noise: one ``randn`` of x_start's shape per step,
            t = T−1 first.
        :return: dict with ``total_bpd`` and ``prior_bpd`` (B,), and (B, T) tensors ``vb``,
            ``xstart_mse``, ``mse`` (ε error). Column 0 holds t = T−1 and the last column the
            decoder term (t = 0), as in improved-diffusion.
        """
        vb, xstart_mse, mse = [], [], []
        for i in range(self.num_timesteps - 1, -1, -1):
            t = torch.full((x_start.shape[0],), i, dtype=torch.long, device=x_start.device)
            noise = randn_like(x_start, generator)
            x_t = self.q_sample(x_start, t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised, model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb = torch.stack(vb, dim=1)  # T x (B,) -> (B, T)
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb.sum(dim=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": torch.stack(xstart_mse, dim=1),  # T x (B,) -> (B, T)
            "mse": torch.stack(mse, dim=1),  # T x (B,) -> (B, T)
        }


def _infer_device(model, noise, device, generator):
    """Explicit device, else the noise's, the model's tensors', the generator's, CPU."""
    candidates = (
        device,
        None if noise is None else noise.device,
        model_device(model),
        None if generator is None else generator.device,
    )
    return torch.device(next((d for d in candidates if d is not None), "cpu"))
