"""`evaluate(cfg)`: bits/dim on held-out data, or FID / IS of samples, into a JSON file.

``metric=nll`` runs the full variational bound (`calc_bpd_loop`, DDPM eq. 5) over the test
split and reports the total, the prior term L_T, the decoder term L_0 and every L_t.
``metric=fid`` scores samples (an npz from sample.py, or drawn here with the configured
sampler) against the training images: Inception FID and IS through torchmetrics, or, for
the 8x8 digits where Inception does not apply, the Fréchet distance and classifier score
in the features of a small digits classifier.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusion.checkpoint import LoadedCheckpoint
from diffusion.evaluation import evaluate_bpd
from diffusion.jobs.checks import check_evaluate_settings, check_respacing, check_samples_npz
from diffusion.jobs.common import (
    autocast_network,
    batch_generator,
    images_progress,
    resolve_devices,
)
from diffusion.jobs.sample import load_chosen_weights, sample
from diffusion.utils.atomic import atomic_save_json, remove_stale_temporaries
from diffusion.utils.checks import require_writable_dir
from diffusion.utils.lock import folder_lock

log = logging.getLogger(__name__)


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
        if "random_flip" in data_cfg:
            data_cfg.random_flip = False
    data = hydra.utils.instantiate(data_cfg)
    data.setup()  # builds every split
    return data


def split_loader(data, split: str):
    loaders = {"train": data.train_dataloader, "val": data.val_dataloader, "test": data.test_dataloader}
    if split not in loaders:
        raise ValueError(f"split={split!r} is not one of {sorted(loaders)}")
    return loaders[split]()


def nll(cfg: DictConfig, loaded: LoadedCheckpoint, device: torch.device) -> dict[str, Any]:
    loader = split_loader(data_for(cfg, loaded), cfg.split)
    total = len(loader.dataset) if cfg.max_batches is None else min(len(loader.dataset), cfg.max_batches * cfg.batch_size)
    model_kwargs_fn = (lambda y: {"y": y}) if loaded.num_classes is not None else None
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
    return results


def fid(cfg: DictConfig, loaded: LoadedCheckpoint, device: torch.device) -> dict[str, Any]:
    datamodule_cfg = cfg.get("data") or loaded.config.get("data") or {}
    is_digits = str(datamodule_cfg.get("_target_", "")).endswith("DigitsData")
    # Everything the metric needs, checked before the (long) sampling.
    if cfg.samples:
        check_samples_npz(cfg.samples, loaded.image_shape)
    require_writable_dir("cache_dir", cfg.cache_dir)
    # Imported here: torchmetrics (with scipy) and torchvision's transforms take seconds to
    # import, which metric=nll and every early error would pay for nothing.
    from diffusion.data.digits import digits_images
    from diffusion.evaluation.fid import (
        DigitsFeatureExtractor,
        FIDEvaluator,
        check_inception_weights,
    )

    if not is_digits:
        check_inception_weights(cfg.inception_weights)
    samples = cfg.samples or sample(cfg, loaded)["npz"]  # the sample job, with this config's sampler
    if is_digits:
        extractor = DigitsFeatureExtractor.load_or_fit(cfg.cache_dir)
        evaluator = FIDEvaluator(extractor, cache_dir=cfg.cache_dir, device=device)
        results = evaluator(samples, dataset="digits", split="train", real_batches=lambda: [digits_images("train")])
    else:
        evaluator = FIDEvaluator(inception_weights=cfg.inception_weights, cache_dir=cfg.cache_dir, device=device)

        def real_batches():
            return split_loader(data_for(cfg, loaded), "train")

        name = datamodule_cfg.get("_target_", "data").rsplit(".", 1)[-1]
        results = evaluator(samples, dataset=f"{name}-{datamodule_cfg.get('image_size', loaded.image_shape[-1])}",
                            split="train", real_batches=real_batches)
    results["samples"] = samples
    log.info("%s", ", ".join(f"{k}: {v:.4f}" for k, v in results.items() if isinstance(v, float)))
    return results


# metric= -> the function that computes it: (cfg, loaded checkpoint, device) -> plain dict.
METRICS = {"nll": nll, "fid": fid}
# metric= -> the result that ranks runs, lower being better (the first one a result has):
# the summary of an evaluate.py sweep (`diffusion.jobs.sweep`).
SCORES = {"nll": ("bpd",), "fid": ("fid", "fid_digits")}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the job into ``<output_dir>/<metric>.json``, written atomically once the metric is
    done (a killed run leaves none), with the output folder locked (`diffusion.utils.lock`)."""
    check_evaluate_settings(cfg, METRICS)  # every setting, before anything is read or written
    device = torch.device(resolve_devices(cfg.device, cfg.num_devices)[0])
    loaded = load_chosen_weights(cfg)
    if cfg.metric == "nll":
        check_respacing(cfg.respacing, loaded)
    path = os.path.join(require_writable_dir("output_dir", cfg.output_dir), f"{cfg.metric}.json")
    with folder_lock(cfg.output_dir):
        remove_stale_temporaries(os.path.dirname(path), [os.path.basename(path)])  # of a killed run
        results = METRICS[cfg.metric](cfg, loaded, device)
        results.update(ckpt=os.path.abspath(cfg.ckpt), weights=loaded.weights, metric=cfg.metric,
                       global_step=loaded.global_step, ema_std=cfg.get("ema_std"))
        atomic_save_json(path, results)
    log.info("wrote %s", path)
    return results
