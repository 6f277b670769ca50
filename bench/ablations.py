"""Same-process ablations: each variant is a pair of override lists (feature on, feature off)
in VARIANTS, applied on top of the run's own overrides.

Every distinct config is measured once per round, in the same process; rounds alternate the
order (forward, then reversed) so that drifts (clocks, temperature, caches) fall on both
sides, and a variant's ratio is the median over rounds of on/off measured in the same round.
Each measurement starts a fresh module, Trainer and torch.compile cache (compilation happens
inside the warm-up steps).
"""

from __future__ import annotations

# ruff: noqa: I001  (common imports diffusion, which must precede lightning and torchvision)

from common import compose_preset  # first: imports diffusion

import dataclasses
import statistics

import torch
from omegaconf import OmegaConf

from train_timing import TrainRun, train_once

# Each variant: (overrides with the feature, overrides without it). One line per variant.
VARIANTS = {
    "channels_last": (["model.channels_last=true"], ["model.channels_last=false"]),
    "bf16": (["trainer.precision=bf16-mixed"], ["trainer.precision=32-true"]),
    "compile": (["model.compile=true"], ["model.compile=false"]),
    "compile_cudagraphs": (["model.compile=true", "model.compile_mode=reduce-overhead"], ["model.compile=true"]),
    "compile_autotune": (["model.compile=true", "model.compile_mode=max-autotune-no-cudagraphs"], ["model.compile=true"]),
    "fused": (["module.optimizer.fused=true"], ["module.optimizer.fused=false"]),
    "grad_checkpoint": (["model.use_checkpoint=true"], ["model.use_checkpoint=false"]),
}


@dataclasses.dataclass
class Ablation:
    name: str
    compares: str
    baseline: TrainRun  # the last run with the feature off
    variant: TrainRun  # the last run with it on
    baseline_rate: float  # median images/s over rounds
    variant_rate: float
    ratio: float  # median over rounds of on/off


def ablate(preset: str, base: list[str], names: list[str], device: torch.device, *, warmup: int,
           steps: int, repeats: int, out: str) -> list[Ablation]:
    """Measure every distinct config of the named variants once per round (see the module's
    docstring for the order), and compare each variant's on and off configs."""
    configs, pairs = {}, {}
    for name in names:
        keys = []
        for extra in VARIANTS[name]:
            cfg = compose_preset(preset, [*base, *extra], out)
            keys.append(OmegaConf.to_yaml(cfg))  # identical configs are measured once
            configs.setdefault(keys[-1], cfg)
        pairs[name] = keys
    rates = {key: [] for key in configs}
    runs = {}
    for round_ in range(repeats):
        order = list(configs) if round_ % 2 == 0 else list(reversed(configs))
        for key in order:
            runs[key] = train_once(configs[key], device, warmup, steps)
            rates[key].append(runs[key].images_per_s)
    results = []
    for name, (on, off) in pairs.items():
        ratios = [a / b for a, b in zip(rates[on], rates[off], strict=True)]
        compares = " ".join(VARIANTS[name][0]) + " vs " + " ".join(VARIANTS[name][1])
        results.append(Ablation(name, compares, runs[off], runs[on], statistics.median(rates[off]),
                                statistics.median(rates[on]), statistics.median(ratios)))
    return results
