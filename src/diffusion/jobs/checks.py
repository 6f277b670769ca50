"""The sample and evaluate jobs' settings, checked before anything is written.

Every check raises a `ConfigError` (a ValueError; FileNotFoundError for a missing file)
whose message names the key, its value and what it must be; the entry points print it as ``error: <message>``
and exit with status 2 (`diffusion.jobs.errors`). The checks of the config alone run first
(`check_sample_settings`, `check_evaluate_settings`); those that need the checkpoint (its
classes, its process's T) right after it loads, still before any output file.
"""

from __future__ import annotations

import os
import re
import zipfile
from typing import Any

import hydra
import numpy as np
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from diffusion.checkpoint import LoadedCheckpoint
from diffusion.jobs.common import PRECISIONS
from diffusion.process.posthoc_ema import STD_MAX, gamma_from_std
from diffusion.process.respace import normalize_section_counts, space_timesteps
from diffusion.sampling import Sampler
from diffusion.sampling.guidance import check_guidance
from diffusion.utils.checks import require_bool, require_choice, require_int
from diffusion.utils.errors import ConfigError

SPLITS = ("train", "val", "test")


# ------------------------------------------------------------------ the config alone
def check_sample_settings(cfg: DictConfig) -> None:
    """Every setting of sample.yaml but the sampler's (`build_sampler`) and the devices'
    (`diffusion.jobs.common.resolve_devices`)."""
    if OmegaConf.is_missing(cfg, "ckpt") or not isinstance(cfg.ckpt, str) or not cfg.ckpt:
        raise ConfigError("ckpt is not set: pass ckpt=PATH, a checkpoint written by train.py or "
                         "python -m diffusion.convert")
    for key, minimum in (("num_samples", 1), ("batch_size", 1), ("seed", 0), ("grid_size", 1)):
        require_int(key, cfg[key], minimum)
    check_weights(cfg.weights)
    check_ema_std(cfg.get("ema_std"), cfg.weights)
    require_choice("precision", str(cfg.precision), PRECISIONS)
    require_bool("clip_denoised", cfg.clip_denoised)
    require_bool("compile", cfg.compile)
    require_bool("progress", cfg.progress)
    class_label_list(cfg.class_labels)


def check_evaluate_settings(cfg: DictConfig, metrics, extractors) -> None:
    """evaluate.yaml's settings: sample.yaml's (metric=fid may sample) and its own; ``metrics``
    and ``extractors`` are the valid ``metric=`` and ``feature_extractor=`` values."""
    require_choice("metric", cfg.metric, metrics)
    check_sample_settings(cfg)
    if cfg.metric != "fid" or cfg.samples is not None:  # no samples are drawn: the drawing settings do nothing
        without = f"metric={cfg.metric}" if cfg.metric != "fid" else f"metric=fid with samples={cfg.samples}"
        if cfg.compile:
            raise ConfigError(f"compile=true compiles the network for sampling, which {without} does not do: "
                              "remove compile=true")
        for key in ("class_labels", "low_res"):
            if cfg.get(key) is not None:
                raise ConfigError(f"{key}={cfg[key]} sets how samples are drawn, and {without} draws none: remove "
                                  f"{key} (metric=nll and ode_nll condition on the split's own labels and images)")
    require_choice("split", cfg.split, SPLITS)
    if cfg.max_batches is not None:
        require_int("max_batches", cfg.max_batches, 1)
    if cfg.respacing is not None:
        normalize_section_counts(cfg.respacing, "respacing")
    for key in ("samples", "inception_weights", "dinov2_weights"):
        if cfg[key] is not None and not (isinstance(cfg[key], str) and cfg[key]):
            raise ConfigError(f"{key}={cfg[key]!r} must be a file path or null")
    require_choice("feature_extractor", cfg.feature_extractor, extractors)
    check_num_seeds(cfg)
    check_neighbour_settings(cfg)
    if cfg.metric == "ode_nll":
        check_ode_settings(cfg)


ODE_DIVERGENCES = ("hutchinson", "exact")  # diffusion.evaluation.ode_nll's; not imported: it loads nothing else
ODE_PROBE_DISTRIBUTIONS = ("rademacher", "gaussian")


def check_ode_settings(cfg: DictConfig) -> None:
    """metric=ode_nll's divergence, probes, tolerances and σ cap."""
    if cfg.ode_divergence not in ODE_DIVERGENCES:
        raise ConfigError(f"ode_divergence={cfg.ode_divergence!r} must be hutchinson (ode_probes random probes) "
                          "or exact (one backward pass per dimension: small images)")
    probes = cfg.ode_probes
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ConfigError(f"ode_probes={probes!r} must be an integer >= 1, e.g. ode_probes=1 (Hutchinson "
                          "probes per image)")
    if cfg.ode_probe_distribution not in ODE_PROBE_DISTRIBUTIONS:
        raise ConfigError(f"ode_probe_distribution={cfg.ode_probe_distribution!r} must be rademacher or gaussian")
    for key in ("ode_rtol", "ode_atol"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ConfigError(f"{key}={value!r} must be a number in (0, 1), e.g. {key}=1e-5 (Song et al.) or "
                              "1e-3 for a quick look")
    cap = cfg.ode_sigma_max
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0):
        raise ConfigError(f"ode_sigma_max={cap!r} must be null (the process's σ_(T-1)) or a noise level > 0")


def check_num_seeds(cfg: DictConfig) -> None:
    """``num_seeds``: how many sample sets metric=fid draws (seeds seed, seed + 1, ...)."""
    require_int("num_seeds", cfg.num_seeds, 1)
    if cfg.num_seeds == 1:
        return
    if cfg.metric != "fid":
        raise ConfigError(f"num_seeds={cfg.num_seeds} repeats metric=fid's sampling; metric={cfg.metric} "
                          "draws no samples: leave num_seeds=1")
    if cfg.samples is not None:
        raise ConfigError(f"num_seeds={cfg.num_seeds} draws one sample set per seed, but samples={cfg.samples} "
                          "is a single given set: pass samples=null to draw them, or num_seeds=1")


def check_neighbour_settings(cfg: DictConfig) -> None:
    """metric=fid's precision/recall, KID and memorisation settings."""
    for key, minimum in (("nearest_k", 1), ("kid_subsets", 1), ("kid_subset_size", 2), ("memorisation_pairs", 0)):
        require_int(key, cfg[key], minimum)
    threshold = cfg.memorisation_threshold
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ConfigError(f"memorisation_threshold={threshold!r} must be in (0, 1], e.g. 0.3333 (a sample "
                          "nearer its nearest training image than a third of that image's own NN distance)")
    if cfg.samples is None and cfg.nearest_k >= cfg.num_samples:
        raise ConfigError(f"nearest_k={cfg.nearest_k} needs more samples than k: set num_samples="
                          f"{cfg.nearest_k + 1} or more, or a smaller nearest_k")


def check_reference_size(num_samples: int, num_reference: int, nearest_k: int, reference: str,
                         samples: str | None = None) -> None:
    """The reference set is as large as the sample set (the ``samples`` npz when given) and
    both exceed precision/recall's k."""
    if num_reference < num_samples:
        fix = (f"pass an npz of at most {num_reference} samples" if samples
               else f"set num_samples={num_reference} or less")
        raise ConfigError(f"the reference set ({reference}) has {num_reference} images, fewer than the "
                          f"{num_samples} samples{f' in samples={samples}' if samples else ''}: {fix}")
    if nearest_k >= num_samples:
        raise ConfigError(f"nearest_k={nearest_k} needs more than {num_samples} samples: set nearest_k="
                          f"{num_samples - 1} or less, or pass more samples")


def check_weights(weights: Any) -> None:
    """``ema``, ``raw`` or an EMA rate in (0, 1); whether the checkpoint has that rate is
    `diffusion.checkpoint.select_weights`'s to say."""
    if weights in ("ema", "raw"):
        return
    try:
        rate = None if isinstance(weights, bool) else float(weights)
    except (TypeError, ValueError):
        rate = None
    if rate is None or not 0 < rate < 1:
        raise ConfigError(f"weights={weights!r} must be ema (the first EMA rate), raw, or an EMA rate such as 0.9999")


def check_ema_std(ema_std: Any, weights: Any) -> None:
    """null, or a σ_rel that a power-function EMA has (post-hoc EMA), with ``weights`` left
    at its default: the two would choose the weights twice."""
    if ema_std is None:
        return
    try:
        gamma_from_std(ema_std)
    except ValueError:
        raise ConfigError(f"ema_std={ema_std!r} must be a σ_rel in (0, {STD_MAX:.4f}] such as 0.05 (post-hoc "
                          "EMA), or null for the weights that weights= chooses") from None
    if weights != "ema":
        raise ConfigError(f"ema_std={ema_std} and weights={weights} both choose the weights; leave out "
                          "weights= (post-hoc EMA) or ema_std=")


# class_labels=input: each image's own label (edit.py: its split image's; sample.py and
# evaluate.py: its low_res image's, from a split or an npz's arr_1, `diffusion.jobs.superres.read_conditioning`)
INPUT_LABELS = "input"


def class_label_list(labels: Any) -> list[int] | None:
    """``class_labels`` as a list of class indices, or None (random labels, or ``input``:
    the inputs' own, checked against the inputs where they are read)."""
    if labels is None or labels == INPUT_LABELS:
        return None
    given = OmegaConf.to_container(labels) if OmegaConf.is_list(labels) else labels
    given = [given] if isinstance(given, int) else given
    if (not isinstance(given, list) or not given
            or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in given)):
        raise ConfigError(f"class_labels={labels!r} must be null (random labels), a class index, "
                         "a non-empty list of class indices such as [0,3], or input (a super-resolution "
                         "model's low_res images' own)")
    return given


# ------------------------------------------------------------------ against the checkpoint
def check_class_labels(labels: Any, num_classes: int | None) -> None:
    """The given labels are classes of the checkpoint's model (which has classes at all)."""
    given = class_label_list(labels)
    if given is None:
        return
    if num_classes is None:
        raise ConfigError(f"class_labels={labels} were given but the checkpoint's model is unconditional; "
                         "leave class_labels=null")
    bad = [c for c in given if c >= num_classes]
    if bad:
        raise ConfigError(f"class_labels {bad} outside 0..{num_classes - 1}, the checkpoint's classes")


def check_respacing(respacing: Any, loaded: LoadedCheckpoint) -> None:
    """A respacing that the checkpoint's process can take."""
    if respacing is None:
        return
    try:
        space_timesteps(loaded.diffusion.num_timesteps, respacing)
    except ValueError as err:
        raise ConfigError(f"respacing={respacing!r}: {err}") from None


def build_sampler(node: DictConfig) -> Sampler:
    """The sampler of ``cfg.sampler``; a bad setting is a ConfigError naming ``sampler.<key>``.
    What the constructor raises about its arguments (ValueError, TypeError: an unknown key or
    a value of the wrong type; ImportError: an unknown ``_target_``) is the user's to fix."""
    try:
        return hydra.utils.instantiate(node)
    except InstantiationException as err:
        if not isinstance(err.__cause__, (ValueError, TypeError, ImportError)):
            raise
        raise sampler_error(node, err.__cause__) from None


def check_sampler(sampler: Sampler, node: DictConfig, loaded: LoadedCheckpoint, null_label: int | None) -> None:
    """The sampler can run on the checkpoint's process and model (steps, guidance)."""
    try:
        sampler.check(loaded.diffusion)  # e.g. more steps than the process has
        check_guidance(sampler.guidance_scale, conditional=loaded.num_classes is not None, null_label=null_label)
    except ValueError as err:
        raise sampler_error(node, err) from None


def sampler_error(node: DictConfig, err: BaseException) -> ConfigError:
    """``err`` prefixed with the ``sampler.<key>=<value>`` settings its message mentions
    (by name, else by a string value it quotes), or with the sampler's target."""
    settings = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    target = str(settings.pop("_target_", "?")).rsplit(".", 1)[-1]
    message = " ".join(str(err).split()) or type(err).__name__
    named = [key for key in settings if re.search(rf"\b{re.escape(key)}\b", message)]
    named = named or [key for key, value in settings.items() if isinstance(value, str) and repr(value) in message]
    where = ", ".join(f"sampler.{key}={settings[key]!r}" for key in named) or f"sampler={target}"
    return ConfigError(f"{where}: {message}")


def check_samples_npz(path: str, image_shape: tuple[int, int, int]) -> None:
    """``samples=``: an npz whose ``arr_0`` is uint8 NHWC images of the checkpoint's shape,
    at least 2 of them (the Fréchet distance needs a covariance)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"samples={path} not found; pass an npz written by sample.py, "
                                "or samples=null to draw them here")
    try:
        with np.load(path, allow_pickle=False) as data:
            names = list(data.files)
            images = data["arr_0"] if "arr_0" in names else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ConfigError(f"samples={path} is not a readable npz ({' '.join(str(err).split())})") from None
    if images is None:
        raise ConfigError(f"samples={path} holds no arr_0 (it holds {names}); pass an npz written by sample.py")
    channels, height, width = image_shape
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (height, width, channels) or len(images) < 2:
        raise ConfigError(
            f"samples={path}: arr_0 is {images.dtype} of shape {images.shape}; expected uint8 NHWC "
            f"(N, {height}, {width}, {channels}) with N >= 2, as sample.py writes for this checkpoint"
        )
