"""Exact likelihood through the probability-flow ODE, in bits/dim on 8-bit data.

Song et al. 2021 (arXiv 2011.13456, sec. 4.3 and App. D.2). In the VE coordinates of the
discrete process (`diffusion.sampling.sigmas`: x̃ = x_t/√ᾱ_t = x_0 + σ n, σ_t = √((1−ᾱ_t)/ᾱ_t))
the probability-flow ODE is dx̃/dσ = (x̃ − D(x̃; σ))/σ with D the model's x̂_0. We integrate in
s = log σ, where it reads

    dx̃/ds = g(x̃, s) = x̃ − D(x̃; e^s),   div g = dim − tr ∂D/∂x̃             (1)

(the same ODE: ds = dσ/σ; the log scale suits an adaptive solver across σ_0 ≈ 10⁻² to
σ_{T−1} ≈ 10² .. 10⁴). Along a solution, d log p_s(x̃(s))/ds = −div g (instantaneous change
of variables, Song et al. eq. 39), so from the data end s_0 = log σ_min to s_1 = log σ_max

    log p_σmin(x̃(s_0)) = log p_σmax(x̃(s_1)) + ∫_{s_0}^{s_1} div g ds.          (2)

The prior: the process's x_T = x̃/√(1+σ_max²) is N(0, I) up to L_T (the assumption of the
variational bound's prior term), so x̃(s_1) ~ N(0, (1+σ_max²) I), and

    log p_σmax(x̃) = −dim/2 · log(2π(1+σ_max²)) − |x̃|²/(2(1+σ_max²)),          (3)

log N(x_T; 0, I) plus the Jacobian −dim/2 · log(1+σ_max²) of x̃ -> x_T. The density is that of
x̃ at σ_min: x̃ = x_0 + σ_min n has the data's own scale, so the data point itself is
evaluated (in the process's x_0 coordinates x_0 = √ᾱ_0 x̃ the density would be taken at
x√ᾱ_0 and carry another −dim/2 · log ᾱ_0, 5·10⁻⁵ nats/dim for a linear schedule; not used).

Dequantization (Song et al. App. D.2; Theis et al. 2016, arXiv 1511.01844): the 8-bit value
k sits at x = k/127.5 − 1 (what the DataModules give, and the bin centres of the variational
bound's discretized decoder); its bin is [x − 1/255, x + 1/255), and x = (k + u − ½)/127.5 − 1
with u ~ U[0, 1)^dim draws a point in it. By Jensen, −log P(k) ≤ E_u[−log p_v(k + u − ½)],
with p_v the density of v = k + u − ½ = 127.5 (x + 1): p_v = p_x / 127.5^dim, so

    bits/dim ≤ E_u[−log₂ p_x(x)]/dim + log₂ 127.5    (log₂ 127.5 = 6.99435...).    (4)

(Song et al.'s code adds 7 = log₂ 128 because it maps k + u to [−1, 1] through k/256; our
bins are centred where the model was trained.) This uniform dequantization gives an upper
bound on the discrete NLL; variational dequantization (Ho et al. 2019, Flow++, arXiv
1902.00275) would tighten it by a gap not estimated here.

Divergence: exact (dim vector-Jacobian products per evaluation: small images only), or
Hutchinson's estimator E_ε[εᵀ J ε] with ``probes`` Rademacher or Gaussian probes, drawn once
per image and kept for the whole integration (Grathwohl et al. 2019, FFJORD, arXiv
1810.01367; Song et al. App. D.2), which keeps the ODE smooth for the adaptive solver. The
identity part of (1) is exact, only tr ∂D/∂x̃ is estimated.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import torch

from diffusion.evaluation.ode_solver import dopri5

DEQUANTIZATION_BITS = math.log2(127.5)  # eq. (4): the Jacobian of v = 127.5 (x + 1), per dim
DIVERGENCES = ("hutchinson", "exact")
PROBE_DISTRIBUTIONS = ("rademacher", "gaussian")

Denoise = Callable[[torch.Tensor, float], torch.Tensor]  # D(x̃; σ): (B, C, ...) -> (B, C, ...)


def dequantize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. (4): x = k/127.5 − 1 (rounded to the 8-bit grid) -> (k + u − ½)/127.5 − 1, u ~ U[0, 1)."""
    k = torch.round((x + 1) * 127.5).clamp(0, 255)
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=generator.device if generator else x.device)
    return (k + u.to(x.device) - 0.5) / 127.5 - 1


def prior_log_prob(x: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """Eq. (3), (B,) nats: log N(x̃; 0, (1 + σ_max²) I)."""
    var = 1.0 + sigma_max**2
    dim = x[0].numel()
    return -0.5 * dim * math.log(2 * math.pi * var) - x.flatten(1).pow(2).sum(1) / (2 * var)


def exact_trace(denoised: torch.Tensor, x: torch.Tensor, probes=None) -> torch.Tensor:
    """tr ∂D/∂x̃ per image (B,): one vector-Jacobian product per dimension."""
    flat = torch.zeros_like(denoised).flatten(1)  # (B, dim)
    trace = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(flat.shape[1]):
        flat.zero_()
        flat[:, i] = 1
        (row,) = torch.autograd.grad(denoised, x, flat.view_as(denoised), retain_graph=True)
        trace = trace + row.flatten(1)[:, i]
    return trace


def hutchinson_trace(denoised: torch.Tensor, x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """tr ∂D/∂x̃ per image (B,), estimated as the mean over probes ε (P, B, C, ...) of εᵀ J ε."""
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for eps in probes:
        (vjp,) = torch.autograd.grad(denoised, x, eps, retain_graph=True)  # εᵀ J, (B, C, ...)
        total = total + (vjp * eps).flatten(1).sum(1)
    return total / probes.shape[0]


TRACES = {"exact": exact_trace, "hutchinson": hutchinson_trace}


def draw_probes(shape, num: int, distribution: str, generator, dtype, device) -> torch.Tensor:
    """(num, *shape) probes with E[ε εᵀ] = I: Rademacher ±1 or standard normal."""
    where = generator.device if generator is not None else device
    if distribution == "rademacher":
        probes = torch.randint(0, 2, (num, *shape), generator=generator, device=where).to(dtype) * 2 - 1
    else:
        probes = torch.randn((num, *shape), generator=generator, device=where, dtype=dtype)
    return probes.to(device)


def ode_log_likelihood(
    denoise: Denoise, x: torch.Tensor, *, sigma_min: float, sigma_max: float, divergence: str = "hutchinson",
    probes: int = 1, probe_distribution: str = "rademacher", rtol: float = 1e-5, atol: float = 1e-5,
    generator: torch.Generator | None = None,
) -> dict:
    """Eq. (2) for each image of ``x`` (B, C, ...), taken as x̃ at σ_min (continuous values: no
    dequantization here). Returns ``log_prob`` (B,) nats, its parts ``prior_log_prob`` (eq. 3)
    and ``delta_log_prob`` (the integral), the end point ``x_end`` and ``nfe`` (network calls)."""
    if divergence not in TRACES:
        raise ValueError(f"divergence={divergence!r} is not one of {', '.join(DIVERGENCES)}")
    shape, dim = x.shape, x[0].numel()
    eps = None if divergence == "exact" else draw_probes(shape, probes, probe_distribution, generator, x.dtype,
                                                          x.device)
    trace_fn = TRACES[divergence]
    s_min, s_max = math.log(sigma_min), math.log(sigma_max)

    def drift(s: float, y: torch.Tensor) -> torch.Tensor:  # eq. (1) and its divergence, (B, dim + 1)
        sigma = math.exp(min(max(s, s_min), s_max))  # the stages stay in [s_0, s_1]; clamp off ulps
        with torch.enable_grad():
            xt = y[:, :dim].detach().view(shape).requires_grad_(True)  # (B, dim + 1) -> (B, C, ...)
            denoised = denoise(xt, sigma)
            div = dim - trace_fn(denoised, xt, eps)
        return torch.cat([(xt - denoised).detach().flatten(1), div.detach()[:, None]], dim=1)

    y0 = torch.cat([x.flatten(1), x.new_zeros(x.shape[0], 1)], dim=1)  # (B, dim) -> (B, dim + 1)
    y1, nfe = dopri5(drift, y0, s_min, s_max, rtol=rtol, atol=atol)
    x_end = y1[:, :dim].view(shape)  # (B, dim + 1) -> (B, C, ...)
    prior = prior_log_prob(x_end, sigma_max)
    return {"log_prob": prior + y1[:, dim], "prior_log_prob": prior, "delta_log_prob": y1[:, dim],
            "x_end": x_end, "nfe": nfe}


def bits_per_dim(log_prob: torch.Tensor, dim: int) -> torch.Tensor:
    """Eq. (4): −log₂ p_x/dim + log₂ 127.5, (B,)."""
    return -log_prob / (dim * math.log(2.0)) + DEQUANTIZATION_BITS


def evaluate_ode_nll(
    denoiser_for: Callable[[torch.Tensor | None], Denoise], batches: Iterable, *, sigma_min: float,
    sigma_max: float, divergence: str = "hutchinson", probes: int = 1, probe_distribution: str = "rademacher",
    rtol: float = 1e-5, atol: float = 1e-5, generator: torch.Generator | None = None,
    progress: Callable[[int], None] | None = None, max_batches: int | None = None,
    device: torch.device | str = "cpu",
) -> dict:
    """Uniformly dequantized bits/dim (eq. 4) over the images of ``batches`` ((images, labels)
    or bare images, NCHW in [-1, 1]); ``denoiser_for(labels)`` gives D(x̃; σ) for a batch.

    Returns a plain dict: ``bpd`` (mean over images), ``bpd_sem`` (its standard error: the
    sample std over images / √N, which holds the dequantization and probe noise too; None for
    one image), ``num_images``, ``dim``, ``nfe`` (network calls, all batches), ``nfe_per_batch``,
    ``seconds`` (wall time), ``prior_bpd`` (eq. 3's share), the settings and σ range.
    """
    started = time.perf_counter()
    bpds, priors, nfes = [], [], []
    for index, batch in enumerate(batches):
        if max_batches is not None and index >= max_batches:
            break
        images, labels = batch if isinstance(batch, (tuple, list)) else (batch, None)
        images = images.to(device, torch.float32 if not images.is_floating_point() else images.dtype)
        labels = labels.to(device) if isinstance(labels, torch.Tensor) else labels
        x = dequantize(images, generator)
        out = ode_log_likelihood(denoiser_for(labels), x, sigma_min=sigma_min, sigma_max=sigma_max,
                                 divergence=divergence, probes=probes, probe_distribution=probe_distribution,
                                 rtol=rtol, atol=atol, generator=generator)
        dim = x[0].numel()
        bpds.append(bits_per_dim(out["log_prob"], dim).double().cpu())
        priors.append((-out["prior_log_prob"] / (dim * math.log(2.0))).double().cpu())
        nfes.append(out["nfe"])
        if progress is not None:
            progress(int(images.shape[0]))
    if not bpds:
        raise ValueError("evaluate_ode_nll got no images (empty batches or max_batches=0)")
    bpd = torch.cat(bpds)
    n = bpd.numel()
    return {
        "bpd": bpd.mean().item(), "bpd_sem": (bpd.std().item() / math.sqrt(n)) if n > 1 else None,
        "prior_bpd": torch.cat(priors).mean().item(), "num_images": n, "dim": dim,
        "nfe": sum(nfes), "nfe_per_batch": nfes, "seconds": time.perf_counter() - started,
        "divergence": divergence, "probes": probes if divergence == "hutchinson" else None,
        "probe_distribution": probe_distribution if divergence == "hutchinson" else None,
        "rtol": rtol, "atol": atol, "sigma_min": sigma_min, "sigma_max": sigma_max,
        "dequantization": "uniform", "dequantization_bits": DEQUANTIZATION_BITS,
    }
