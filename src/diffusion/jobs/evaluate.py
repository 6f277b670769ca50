"""`evaluate(cfg)`: bits/dim on held-out data, or FID / IS of samples, into a JSON file.

``metric=nll`` runs the full variational bound (`calc_bpd_loop`, DDPM eq. 5) over the test
split and reports the total, the prior term L_T, the decoder term L_0 and every L_t.
``metric=ode_nll`` reports the likelihood of the probability-flow ODE instead (Song et al.
2021, sec. 4.3; `diffusion.evaluation.ode_nll`): bits/dim of uniformly dequantized data with
its standard error, the number of network calls and the wall time.
``metric=fid`` scores samples (an npz from sample.py, or drawn here with the configured
sampler) against the training images: Inception FID and IS through torchmetrics, or, for
the 8x8 digits where Inception does not apply, the Fréchet distance and classifier score
in the features of a small digits classifier; with ``feature_extractor=dinov2``, FD-DINOv2
(no score). On the same features, extracted once (and the reference set's cached), it also
reports improved precision/recall, KID and a nearest-neighbour memorisation audit
(`diffusion.evaluation.neighbours`), whose closest (sample, training image) pairs go to
``memorisation.png`` beside the result. ``num_seeds=N`` repeats the sampling and scoring with
seeds seed, ..., seed + N - 1 and reports every metric's spread over them (`combine_seeds`).

Every result names what it was computed from (`protocol`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusion.checkpoint import LoadedCheckpoint
from diffusion.evaluation import evaluate_bpd
from diffusion.jobs.checks import (
    check_class_labels,
    check_evaluate_settings,
    check_reference_size,
    check_respacing,
    check_samples_npz,
)
from diffusion.jobs.common import (
    autocast_network,
    batch_generator,
    images_progress,
    resolve_devices,
)
from diffusion.jobs.sample import load_chosen_weights, sample
from diffusion.jobs.superres import (
    check_conditioning,
    condition_on_split,
    loader_model_kwargs,
    wrapped_data,
)
from diffusion.utils.atomic import atomic_save_json, remove_stale_temporaries
from diffusion.utils.checks import require_writable_dir
from diffusion.utils.errors import ConfigError
from diffusion.utils.host_memory import retain_freed_memory
from diffusion.utils.images import save_image_grid
from diffusion.utils.lock import folder_lock

log = logging.getLogger(__name__)

MEMORISATION_GRID = "memorisation.png"  # metric=fid's closest (sample, training image) pairs


def data_for(cfg: DictConfig, loaded: LoadedCheckpoint):
    """The run's dataset (or ``data=...`` given here), without augmentation, split."""
    data_cfg = cfg.get("data") or loaded.config.get("data")
    if not data_cfg or "_target_" not in data_cfg:
        raise ValueError(
            f"{cfg.ckpt} names no dataset (a converted checkpoint?); pass one, e.g. data=cifar10 data.root=PATH"
        )
    data_cfg = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(data_cfg), resolve=True))
    with open_dict(data_cfg):
        data_cfg.batch_size = cfg.batch_size
        without_flips(data_cfg)
    data = hydra.utils.instantiate(data_cfg)
    data.setup()  # builds every split
    return data


def without_flips(data_cfg: DictConfig) -> None:
    """Set every ``random_flip`` of a data config to false, also a wrapped dataset's (a
    super-resolution pair's ``data``): a training-split image read here (FID's reference set,
    low_res=split:train, edit.py's inputs) must be the same image at every read, or a resumed
    job would pair new inputs with the shards of old ones."""
    for key, value in data_cfg.items():
        if key == "random_flip":
            data_cfg[key] = False
        elif isinstance(value, DictConfig):
            without_flips(value)


def split_loader(data, split: str):
    loaders = {"train": data.train_dataloader, "val": data.val_dataloader, "test": data.test_dataloader}
    if split not in loaders:
        raise ValueError(f"split={split!r} is not one of {sorted(loaders)}")
    return loaders[split]()


def nll(cfg: DictConfig, loaded: LoadedCheckpoint, device: torch.device) -> dict[str, Any]:
    loader = split_loader(data_for(cfg, loaded), cfg.split)
    total = len(loader.dataset) if cfg.max_batches is None else min(len(loader.dataset), cfg.max_batches * cfg.batch_size)
    model_kwargs_fn = loader_model_kwargs(loaded, device)  # labels as y; a super-resolution pair's low_res
    with torch.inference_mode(), images_progress(total, 0, f"bits/dim ({cfg.split})", enabled=cfg.progress) as advance:
        results = evaluate_bpd(
            loaded.diffusion, autocast_network(loaded.model.to(device), device, cfg.precision), loader,
            clip_denoised=cfg.clip_denoised, model_kwargs_fn=model_kwargs_fn, progress=advance,
            max_batches=cfg.max_batches, respacing=cfg.respacing,
            generator=batch_generator(cfg.seed, 0, device),
            device=device,  # the model is a closure here: the batches cannot find its device
        )
    log.info("%s bits/dim: %.4f (prior %.2e, decoder %.4f) over %d images",
             cfg.split, results["bpd"], results["prior_bpd"], results["decoder_bpd"], results["num_images"])
    return {**results, **protocol(cfg, loaded)}


def ode_nll(cfg: DictConfig, loaded: LoadedCheckpoint, device: torch.device) -> dict[str, Any]:
    """The probability-flow ODE's bits/dim of uniformly dequantized data (an upper bound on
    the discrete NLL; `diffusion.evaluation.ode_nll`), with D(x̃; σ) from the checkpoint's
    mean output (`diffusion.sampling.sigmas.Denoiser`, any parameterisation but previous_x)."""
    from diffusion.evaluation.ode_nll import evaluate_ode_nll
    from diffusion.sampling.sigmas import Denoiser, NoiseLevels, check_mean_type

    try:
        check_mean_type(loaded.diffusion)
        levels = NoiseLevels(loaded.diffusion)
    except ValueError as err:
        raise ConfigError(f"metric=ode_nll: {err}") from None
    sigma_max = levels.sigma_max if cfg.ode_sigma_max is None else min(float(cfg.ode_sigma_max), levels.sigma_max)
    if not sigma_max > levels.sigma_min:
        raise ConfigError(f"ode_sigma_max={cfg.ode_sigma_max} is not above the process's σ_0 = "
                          f"{levels.sigma_min:.4g}: raise it or leave it null")
    loader = split_loader(data_for(cfg, loaded), cfg.split)
    total = len(loader.dataset) if cfg.max_batches is None else min(len(loader.dataset), cfg.max_batches * cfg.batch_size)
    network = loaded.model.to(device).requires_grad_(False)  # gradients w.r.t. the images only
    model_kwargs_fn = loader_model_kwargs(loaded, device)
    model = autocast_network(network, device, cfg.precision)

    def denoiser_for(labels):
        kwargs = None if model_kwargs_fn is None else model_kwargs_fn(labels)
        return Denoiser(loaded.diffusion, model, model_kwargs=kwargs, clip_denoised=False)  # a clamp has no divergence

    with images_progress(total, 0, f"ODE bits/dim ({cfg.split})", enabled=cfg.progress) as advance:
        results = evaluate_ode_nll(
            denoiser_for, loader, sigma_min=levels.sigma_min, sigma_max=sigma_max, divergence=cfg.ode_divergence,
            probes=cfg.ode_probes, probe_distribution=cfg.ode_probe_distribution, rtol=float(cfg.ode_rtol),
            atol=float(cfg.ode_atol), generator=batch_generator(cfg.seed, 0, device), progress=advance,
            max_batches=cfg.max_batches, device=device)
    results.update(protocol(cfg, loaded))
    sem = results["bpd_sem"]
    log.info("%s ODE bits/dim: %.4f ± %s over %d images, %d function evaluations, %.1f s", cfg.split,
             results["bpd"], "n/a" if sem is None else f"{sem:.4f}", results["num_images"], results["nfe"],
             results["seconds"])
    return results


@dataclass
class ReferenceSet:
    """The images the samples are scored against (the training split), in a fixed order:
    ``name`` keys the feature cache, ``batches`` builds them, ``images`` picks some by index."""

    name: str
    batches: Callable[[], Any]
    images: Callable[[list[int]], torch.Tensor]  # indices -> uint8 (N, C, H, W)


# Data settings that only change how batches are loaded, not which images: not in the cache key.
LOADER_KEYS = ("batch_size", "num_workers", "pin_memory", "persistent_workers", "download", "random_flip")


def without_loader_keys(settings: dict) -> dict:
    """``settings`` without `LOADER_KEYS`, also in a wrapped dataset's (a super-resolution
    config's ``data``): its flips were once on here, and its old cache must not match."""
    return {k: without_loader_keys(v) if isinstance(v, dict) else v for k, v in settings.items() if k not in LOADER_KEYS}


def reference_set(cfg: DictConfig, loaded: LoadedCheckpoint, datamodule_cfg, is_digits: bool) -> ReferenceSet:
    """The training split; the digits' is `diffusion.data.digits`' split, the classifier's own."""
    from diffusion.data.digits import digits_images
    from diffusion.evaluation.fid import to_uint8_nchw

    if is_digits:
        train = digits_images("train")[0]
        return ReferenceSet("digits", lambda: [train], lambda indices: train[indices])
    data = functools.cache(lambda: data_for(cfg, loaded))  # built only when the cache has no features
    # Every setting that changes the images (root, size, split seed, ...) is in the cache key.
    settings = without_loader_keys(OmegaConf.to_container(OmegaConf.create(dict(datamodule_cfg)), resolve=True))
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    name = f"{settings['_target_'].rsplit('.', 1)[-1]}-{settings.get('image_size', loaded.image_shape[-1])}-{digest}"

    def batches():  # in order, so that an index names the same image next time
        return torch.utils.data.DataLoader(data().train_set, batch_size=cfg.batch_size, shuffle=False)

    return ReferenceSet(name, batches, lambda indices: torch.cat([to_uint8_nchw(data().train_set[i][0][None])
                                                                  for i in indices]))


def inception_features(cfg: DictConfig, is_digits: bool):
    """torch-fidelity's Inception; on the digits, where it does not apply to 8x8 images, the
    digits classifier (trained once into ``cache_dir``)."""
    from diffusion.evaluation.fid import DigitsFeatureExtractor, InceptionFeatureExtractor

    if is_digits:
        return DigitsFeatureExtractor.load_or_fit(cfg.cache_dir)
    return InceptionFeatureExtractor(cfg.inception_weights)


def dinov2_features(cfg: DictConfig, is_digits: bool):
    """DINOv2's CLS token (FD-DINOv2) from the checkpoint file ``dinov2_weights``."""
    from diffusion.evaluation.fid import DINOv2FeatureExtractor

    return DINOv2FeatureExtractor(cfg.dinov2_weights)


# feature_extractor= -> (cfg, is_digits) -> the FeatureExtractor; each checks its weights file.
FEATURE_EXTRACTORS = {"inception": inception_features, "dinov2": dinov2_features}


def fid(cfg: DictConfig, loaded: LoadedCheckpoint, device: torch.device) -> dict[str, Any]:
    datamodule_cfg = cfg.get("data") or loaded.config.get("data") or {}
    is_digits = str(wrapped_data(datamodule_cfg).get("_target_", "")).endswith("DigitsData")  # SuperResData: the wrapped one's
    # Everything the metric needs, checked before the (long) sampling.
    if cfg.samples:
        check_samples_npz(cfg.samples, loaded.image_shape)
    require_writable_dir("cache_dir", cfg.cache_dir)
    # Imported here: torchmetrics (with scipy) and torchvision's transforms take seconds to
    # import, which metric=nll and every early error would pay for nothing.
    from diffusion.evaluation.fid import FIDEvaluator

    evaluator = FIDEvaluator(
        FEATURE_EXTRACTORS[cfg.feature_extractor](cfg, is_digits), cache_dir=cfg.cache_dir, device=device,
        seed=cfg.seed, nearest_k=cfg.nearest_k, kid_subsets=cfg.kid_subsets, kid_subset_size=cfg.kid_subset_size,
        memorisation_threshold=float(cfg.memorisation_threshold), memorisation_pairs=cfg.memorisation_pairs)
    reference = reference_set(cfg, loaded, datamodule_cfg, is_digits)
    # The reference features (cached after the first run) come before the samples, so that a
    # reference set too small for them fails before the sampling.
    ref = evaluator.reference_stats(reference.name, "train", reference.batches)
    num_samples = count_samples(cfg.samples) if cfg.samples else cfg.num_samples
    check_reference_size(num_samples, ref["num_images"], cfg.nearest_k, f"{reference.name} train", cfg.samples)
    seeds = [cfg.seed + i for i in range(cfg.num_seeds)]
    draws, runs = score_seeds(cfg, loaded, evaluator, reference.name, seeds)
    results = combine_seeds(runs, evaluator.metric_keys)
    samples = cfg.samples or draws[0]["npz"]  # memorisation.png: the first seed's pairs
    results["memorisation_grid"] = save_memorisation_grid(cfg, samples, reference, results["memorisation_pairs"])
    log.info("%s", ", ".join(f"{k}: {results[k]:.4f}" for k in evaluator.metric_keys))
    return {**results, **protocol(cfg, loaded, seeds=seeds, draws=draws, extractor=evaluator.extractor,
                                  reference={"dataset": reference.name, "split": "train",
                                             "num_images": int(ref["num_images"])})}


def score_seeds(cfg: DictConfig, loaded: LoadedCheckpoint, evaluator, reference: str,
                seeds: list[int]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per seed: the samples drawn by the sample job with this config's sampler (or the given
    ``samples``: then ``seeds`` is one) and their scores, the evaluator's draws (IS splits,
    KID subsets) seeded alike, so each seed's result is that of num_seeds=1 seed=<seed>.
    Returns (the sample job's returns, the results), in the order of ``seeds``."""
    draws, runs = [], []
    for seed in seeds:
        drawn = {} if cfg.samples else draw_samples(cfg, loaded, seed)
        draws.append(drawn)
        runs.append(evaluator(cfg.samples or drawn["npz"], dataset=reference, split="train", seed=seed))
    return draws, runs


def draw_samples(cfg: DictConfig, loaded: LoadedCheckpoint, seed: int) -> dict[str, Any]:
    """The sample job with ``seed``. With ``num_seeds`` > 1 each seed writes into its own
    ``<output_dir>/seed<seed>/``, so that no seed's npz or shards replace another's."""
    if cfg.num_seeds == 1:
        return sample(cfg, loaded)
    seed_cfg = copy.deepcopy(cfg)
    with open_dict(seed_cfg):
        seed_cfg.seed = seed
        seed_cfg.output_dir = os.path.join(cfg.output_dir, f"seed{seed}")
    return sample(seed_cfg, loaded)


def combine_seeds(runs: list[dict[str, Any]], metric_keys: tuple[str, ...]) -> dict[str, Any]:
    """The result of one seed as it is. Of several: the first seed's, with each metric of
    ``metric_keys`` replaced by its mean over the seeds, and ``over_seeds``: per metric its
    ``per_seed`` values, ``mean``, ``std`` (the sample standard deviation, ddof = 1) and
    ``min`` (EDM, Karras et al. 2022, arXiv 2206.00364, reports the minimum FID of three
    seeds). What is not a metric (``memorisation_pairs``, settings) is the first seed's."""
    if len(runs) == 1:
        return dict(runs[0])
    summary = {}
    for key in metric_keys:
        values = np.array([run[key] for run in runs], dtype=np.float64)  # (num_seeds,)
        summary[key] = {"per_seed": values.tolist(), "mean": float(values.mean()),
                        "std": float(values.std(ddof=1)), "min": float(values.min())}
    return {**runs[0], **{key: entry["mean"] for key, entry in summary.items()},
            "over_seeds": {"std_ddof": 1, **summary}}


def protocol(cfg: DictConfig, loaded: LoadedCheckpoint, *, seeds: list[int] | None = None,
             draws: list[dict[str, Any]] = (), extractor=None, reference: dict | None = None) -> dict[str, Any]:
    """What a result was computed from; every ``<metric>.json`` has it, and this is the one
    list of it.

    Every metric: ``metric``; the checkpoint ``ckpt`` (absolute path), its ``global_step`` and
    ``weights`` (``ema_<rate>``, ``raw`` or ``phema_<σ_rel>@<step>``) with ``ema_std`` (the
    σ_rel asked for, or null); ``seed``. nll and ode_nll: the ``split``. metric=fid: ``seeds``
    (seed, seed + 1, ..., one per ``num_seeds``) and ``num_seeds``; ``samples`` (the npz,
    a list of one per seed when there are several); the ``sampler``'s config and its ``nfe``
    (network calls per sample), both null for samples= given; ``sampling``, the other settings
    that decide drawn samples (``precision``, ``clip_denoised``, ``class_labels``, ``low_res``,
    ``compile``; null for samples= given); the ``reference`` set
    (dataset, split, num_images); ``feature_extractor`` and ``feature_extractor_sha256``, the
    SHA-256 of its weights file (Inception's, the DINOv2 checkpoint, or the digits
    classifier's cache file). The number of samples is the metric's own ``num_samples``.
    """
    facts = {"metric": cfg.metric, "ckpt": os.path.abspath(cfg.ckpt), "global_step": loaded.global_step,
             "weights": loaded.weights, "ema_std": cfg.get("ema_std"), "seed": cfg.seed}
    if cfg.metric != "fid":
        return {**facts, "split": cfg.split}
    drawn = [d for d in draws if d]
    samples = [d["npz"] for d in drawn] or [os.path.abspath(cfg.samples)]
    labels = cfg.class_labels
    sampling = {"precision": str(cfg.precision), "clip_denoised": bool(cfg.clip_denoised),
                "class_labels": OmegaConf.to_container(labels) if OmegaConf.is_config(labels) else labels,
                "low_res": None if cfg.get("low_res") is None else str(cfg.low_res), "compile": bool(cfg.compile)}
    return {**facts, "seeds": seeds, "num_seeds": len(seeds), "samples": samples[0] if len(samples) == 1 else samples,
            "sampler": drawn[0]["sampler"] if drawn else None, "nfe": drawn[0]["nfe"] if drawn else None,
            "sampling": sampling if drawn else None,
            "reference": reference, "feature_extractor": extractor.name,
            "feature_extractor_sha256": extractor.weights_sha256}


def count_samples(path: str) -> int:
    with np.load(path, allow_pickle=False) as data:
        return len(data["arr_0"])


def save_memorisation_grid(cfg: DictConfig, samples: str, reference: ReferenceSet, pairs: list) -> str | None:
    """``memorisation.png`` beside the result: each sample of ``pairs`` (closest first) next to
    its nearest training image, four pairs a row; None when there are no pairs."""
    if not pairs:
        return None
    with np.load(samples, allow_pickle=False) as data:
        images = torch.from_numpy(data["arr_0"][[i for i, _, _ in pairs]]).permute(0, 3, 1, 2)  # NHWC -> NCHW
    train = reference.images([j for _, j, _ in pairs])
    pairs_nchw = torch.stack([images, train], dim=1).flatten(0, 1)  # 2 x (P, C, H, W) -> (2P, C, H, W)
    path = os.path.join(cfg.output_dir, MEMORISATION_GRID)
    save_image_grid(pairs_nchw.float() / 127.5 - 1, path, nrow=8)
    return os.path.abspath(path)


# metric= -> the function that computes it: (cfg, loaded checkpoint, device) -> plain dict.
METRICS = {"nll": nll, "ode_nll": ode_nll, "fid": fid}
# metric= -> the result that ranks runs, lower being better (the first one a result has):
# the summary of an evaluate.py sweep (`diffusion.jobs.sweep`).
SCORES = {"nll": ("bpd",), "ode_nll": ("bpd",), "fid": ("fid", "fid_digits", "fd_dinov2")}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the job into ``<output_dir>/<metric>.json``, written atomically once the metric is
    done (a killed run leaves none), with the output folder locked (`diffusion.utils.lock`)."""
    check_evaluate_settings(cfg, METRICS, FEATURE_EXTRACTORS)  # every setting, before anything is read or written
    retain_freed_memory()  # glibc keeps freed host memory for the next batch (utils/host_memory.py)
    device = torch.device(resolve_devices(cfg.device, cfg.num_devices)[0])
    loaded = load_chosen_weights(cfg)
    if cfg.metric == "nll":
        check_respacing(cfg.respacing, loaded)
    if cfg.metric == "fid" and not cfg.samples:
        condition_on_split(cfg, loaded)  # a super-resolution model: sample i on image i of split, downsampled
        # the sample job's checks that read nothing, before any folder, classifier or reference set is made
        check_class_labels(cfg.class_labels, loaded.num_classes)
        check_conditioning(cfg, loaded)
    path = os.path.join(require_writable_dir("output_dir", cfg.output_dir), f"{cfg.metric}.json")
    with folder_lock(cfg.output_dir):
        remove_stale_temporaries(os.path.dirname(path), [os.path.basename(path), MEMORISATION_GRID])  # of a killed run
        results = METRICS[cfg.metric](cfg, loaded, device)  # the metric's numbers and their `protocol`
        atomic_save_json(path, results)
    log.info("wrote %s", path)
    return results
