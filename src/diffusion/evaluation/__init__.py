"""Evaluation: the variational bound and the probability-flow ODE likelihood in bits/dim over
a dataset, and FID / Inception Score (Inception, DINOv2 or the digits classifier's features).

    from diffusion.evaluation import evaluate_bpd, FIDEvaluator, DigitsFeatureExtractor

Depends on the process layer and torchmetrics only (no trainer, no config system); every
function returns a plain dict and prints nothing. Names load on first use, so importing
``evaluate_bpd`` does not pull in torchmetrics' Inception.
"""

from __future__ import annotations

from diffusion.utils.lazy import lazy_exports

_EXPORTS = {
    "evaluate_bpd": "diffusion.evaluation.bpd",
    "respace_process": "diffusion.evaluation.bpd",
    "evaluate_ode_nll": "diffusion.evaluation.ode_nll",
    "ode_log_likelihood": "diffusion.evaluation.ode_nll",
    "FIDEvaluator": "diffusion.evaluation.fid",
    "FeatureExtractor": "diffusion.evaluation.fid",
    "InceptionFeatureExtractor": "diffusion.evaluation.fid",
    "DigitsFeatureExtractor": "diffusion.evaluation.fid",
    "DINOv2FeatureExtractor": "diffusion.evaluation.fid",
    "INCEPTION_WEIGHTS_URL": "diffusion.evaluation.fid",
    "DINOV2_WEIGHTS_URL": "diffusion.evaluation.fid",
    "to_uint8_nchw": "diffusion.evaluation.fid",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports("diffusion.evaluation", _EXPORTS, globals())
