"""`check_train_config`: every train.py key with a domain, checked before anything runs.

Each check names the key and the value the user gave (``module.optimizer.lr=-1 must be a
positive number``) and raises `ConfigError`, which train.py prints as ``error: ...`` and exit
status 2. They run on the composed config alone, before the data is read or any file is
written, and without importing Lightning, so a typo costs a second, not a minute.

The constructors check the rest, with the data's shape at hand (a UNet level that the image
never reaches, a GroupNorm width, label dropout without labels); `run.train` builds them
under `diffusion.utils.errors.config_errors`, which names their config group. Where a
choice has a registry in the code (the schedule samplers, the process's enums), the check
asks that registry rather than repeating its names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion.checkpoint import COMPILE_MODES
from diffusion.process.gaussian_diffusion import (
    LossType,
    LossWeighting,
    ModelMeanType,
    ModelVarType,
)
from diffusion.process.posthoc_ema import STD_MAX, check_stds
from diffusion.utils.errors import ConfigError

# A check returns what the value must be ("must be ...") or None when it is fine.
Check = Callable[[Any], "str | None"]

# Lightning's precision names (lightning.fabric's _PRECISION_INPUT, old aliases included).
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true",
              "transformer-engine", "transformer-engine-float16")
PRECISION_ALIASES = ("32", "16", "bf16", "64", 32, 16, 64)
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")
MATMUL_PRECISIONS = ("highest", "high", "medium")


# ------------------------------------------------------------------------------ checks
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(minimum: int | None = None, *also: int, maximum: int | None = None) -> Check:
    """An int in [minimum, maximum] (or one of ``also``, e.g. -1 for "all")."""
    def check(value: Any) -> str | None:
        if _is_int(value) and (value in also or (
                (minimum is None or value >= minimum) and (maximum is None or value <= maximum))):
            return None
        bounds = [f">= {minimum}"] if minimum is not None else []
        bounds += [f"<= {maximum}"] if maximum is not None else []
        return f"must be an integer {' and '.join(bounds)}".rstrip() + (
            f" (or {', '.join(map(str, also))})" if also else "")
    return check


def number(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False,
           what: str | None = None) -> Check:
    """A finite number in the interval [low, high] (ends open where asked)."""
    def check(value: Any) -> str | None:
        if _is_number(value) and (value > low if low_open else value >= low) and (
                value < high if high_open else value <= high):
            return None
        if what:
            return f"must be {what}"
        left, right = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
        return f"must be a number in {left}{low:g}, {high:g}{right}"
    return check


def choice(*choices: Any, aliases: tuple[Any, ...] = ()) -> Check:
    """One of ``choices`` (or of ``aliases``, accepted but not listed)."""
    def check(value: Any) -> str | None:
        if not isinstance(value, bool) and value in (*choices, *aliases):
            return None
        return "must be one of " + ", ".join(show(c) for c in choices)
    return check


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def text(value: Any) -> str | None:
    return None if isinstance(value, str) and value else "must be a non-empty string"


def optional(check: Check) -> Check:
    """``check``, or null."""
    def checked(value: Any) -> str | None:
        problem = None if value is None else check(value)
        return None if problem is None else f"{problem}, or null"
    return checked


def either(*checks: Check, what: str) -> Check:
    def check(value: Any) -> str | None:
        return None if any(c(value) is None for c in checks) else f"must be {what}"
    return check


def int_list(minimum: int, *, what: str) -> Check:
    """A list of ints >= ``minimum`` (or the same as a comma string, ``"16,8"``)."""
    def check(value: Any) -> str | None:
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*(,\s*-?\d+\s*)*,?", value):
            value = [int(v) for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple, ListConfig)) and all(_is_int(v) and v >= minimum for v in value):
            return None
        return f"must be {what}"
    return check


def sigma_rels(value: Any) -> str | None:
    """A list of distinct σ_rel values of power-function EMA profiles (post-hoc EMA)."""
    try:
        check_stds(OmegaConf.to_container(value) if isinstance(value, ListConfig) else value)
    except ValueError:
        return f"must be a list of distinct σ_rel values in (0, {STD_MAX:.4f}], e.g. [0.05,0.1]"
    return None


POSITIVE = number(0, low_open=True, what="a positive number")
PROBABILITY = number(0, 1, high_open=True)
# A Lightning "how much": an int count of batches, or a float fraction in [0, 1].
FRACTION_OR_COUNT = either(integer(0), number(0, 1), what="an integer >= 0 (batches) or a fraction in [0, 1]")

TRAIN_KEYS: dict[str, Check] = {
    "seed": optional(integer(0, maximum=2**32 - 1)),  # numpy's seed range
    "class_cond": boolean,
    "ckpt_path": optional(text),
    "test_after_fit": boolean,
    "matmul_precision": optional(choice(*MATMUL_PRECISIONS)),
    "retain_freed_memory": boolean,
    # module (DiffusionModule): the optimizer is only built once fit starts, so its
    # numbers are checked here.
    "module.label_dropout": PROBABILITY,
    "module.warmup_steps": integer(0),
    "module.val_seed": integer(0),
    "module.nonfinite.max_consecutive": integer(1),
    "module.optimizer.lr": POSITIVE,
    "module.optimizer.weight_decay": number(0, what="a number >= 0"),
    "module.optimizer.eps": POSITIVE,
    "module.optimizer.momentum": number(0, what="a number >= 0"),
    "module.optimizer.betas": lambda v: None if (
        isinstance(v, (list, tuple, ListConfig)) and len(v) == 2 and all(PROBABILITY(b) is None for b in v)
    ) else "must be two numbers in [0, 1), e.g. [0.9,0.999]",
    "module.optimizer.fused": optional(boolean),
    # model (UNet): types and ranges; the constructor checks what depends on the image size.
    "model.model_channels": integer(1),
    "model.num_res_blocks": integer(1),
    "model.dropout": PROBABILITY,
    "model.channel_mult": optional(int_list(1, what="a list of positive integers, e.g. [1,2,2,2]")),
    "model.attention_resolutions": optional(int_list(1, what="a list of feature-map sizes in pixels, e.g. [16,8]")),
    "model.num_heads": integer(1),
    "model.num_head_channels": integer(1, -1),
    "model.num_heads_upsample": integer(1, -1),
    "model.conv_resample": boolean,
    "model.use_scale_shift_norm": boolean,
    "model.resblock_updown": boolean,
    "model.use_checkpoint": boolean,
    "model.channels_last": boolean,
    "model.compile": boolean,
    "model.compile_mode": optional(choice(*COMPILE_MODES)),
    # diffusion (GaussianDiffusion and its schedule)
    "diffusion.model_mean_type": choice(*(m.value for m in ModelMeanType)),
    "diffusion.model_var_type": choice(*(m.value for m in ModelVarType)),
    "diffusion.loss_type": choice(*(m.value for m in LossType)),
    "diffusion.loss_weighting": choice(*(m.value for m in LossWeighting)),
    "diffusion.min_snr_gamma": POSITIVE,
    "diffusion.rescale_timesteps": boolean,
    "diffusion.betas.num_diffusion_timesteps": integer(2),
    "diffusion.betas.zero_terminal_snr": boolean,
    # trainer (lightning.Trainer)
    "trainer.max_steps": integer(1, -1),
    "trainer.max_epochs": optional(integer(1, -1)),
    "trainer.precision": choice(*PRECISIONS, aliases=PRECISION_ALIASES),
    "trainer.accelerator": choice(*ACCELERATORS),
    "trainer.devices": either(integer(1, -1), choice("auto"), int_list(0, what=""),
                              what="a number of devices >= 1, -1 (all), auto, or a list of device indices"),
    "trainer.num_nodes": integer(1),
    "trainer.gradient_clip_val": optional(number(0, what="a number >= 0 (0 or null: no clipping)")),
    "trainer.gradient_clip_algorithm": optional(choice("norm", "value")),
    "trainer.accumulate_grad_batches": integer(1),
    "trainer.log_every_n_steps": integer(0),  # 0: Lightning logs nothing
    "trainer.val_check_interval": optional(either(integer(1), number(0, 1, low_open=True),
                                                  what="a number of steps >= 1 or a fraction in (0, 1]")),
    "trainer.check_val_every_n_epoch": optional(integer(1)),
    "trainer.limit_train_batches": FRACTION_OR_COUNT,
    "trainer.limit_val_batches": FRACTION_OR_COUNT,
    "trainer.limit_test_batches": FRACTION_OR_COUNT,
    "trainer.num_sanity_val_steps": integer(0, -1),
    "trainer.deterministic": either(boolean, choice("warn"), what="true, false or warn"),
    "trainer.fast_dev_run": either(boolean, integer(0), what="true, false or a number of batches"),
    # callbacks whose constructors are Lightning's
    "callbacks.model_checkpoint.every_n_train_steps": optional(integer(0)),
    "callbacks.model_checkpoint.save_top_k": integer(-1),
    "callbacks.posthoc_ema.stds": sigma_rels,
    "callbacks.posthoc_ema.snapshot_every": integer(1),
}
# Keys of the data group, whatever the dataset (each dataset has some of them).
DATA_KEYS: dict[str, Check] = {
    "batch_size": integer(1),
    "num_workers": integer(0),
    "image_size": integer(1),
    "crop_size": integer(1),
    "val_fraction": number(0, 1, low_open=True, high_open=True),
    "test_fraction": number(0, 1, low_open=True, high_open=True),
    "val_size": integer(1),
    "split_seed": integer(0),
    "root": text,
    "download": boolean,
    "random_flip": boolean,
    "pin_memory": boolean,
    "persistent_workers": boolean,
}


def show(value: Any) -> str:
    """A value as the user would type it on the command line."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show(v) for v in value) + "]"
    return str(value)


_ABSENT = object()


def check_keys(cfg: DictConfig, checks: dict[str, Check], prefix: str = "") -> None:
    """Raise `ConfigError` at the first key of ``checks`` present in ``cfg`` whose value fails."""
    for key, check in checks.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        problem = check(value)
        if problem:
            raise ConfigError(f"{prefix}{key}={show(value)} {problem}")


def check_train_config(cfg: DictConfig) -> None:
    """Check every key of a composed train config that has a domain (see the module doc)."""
    check_keys(cfg, TRAIN_KEYS)
    if cfg.get("data") is not None:
        check_keys(cfg.data, DATA_KEYS, prefix="data.")
    fractions = [cfg.data.get(k) for k in ("val_fraction", "test_fraction")] if cfg.get("data") else []
    if len(fractions) == 2 and None not in fractions and sum(fractions) >= 1:
        raise ConfigError(f"data.val_fraction={fractions[0]} and data.test_fraction={fractions[1]} "
                          "leave nothing to train on: their sum must be less than 1")
    model = cfg.get("model") or {}
    if model.get("compile_mode") is not None and not model.get("compile"):
        raise ConfigError(f"model.compile_mode={model.compile_mode} has no effect without model.compile=true: "
                          "set model.compile=true, or remove model.compile_mode")
    trainer = cfg.get("trainer") or {}
    if trainer.get("max_steps") == -1 and trainer.get("max_epochs") in (-1, None):
        raise ConfigError("trainer.max_steps=-1 and trainer.max_epochs=-1 would train forever: "
                          "set trainer.max_steps to a number of optimizer steps")
