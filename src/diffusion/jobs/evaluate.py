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

from diffusion.evaluation import DigitsFeatureExtractor, FIDEvaluator, digits_images, evaluate_bpd
from diffusion.jobs.common import (
    autocast_network,
    batch_generator,
    images_progress,
    resolve_devices,
)
from diffusion.training.checkpoint import LoadedCheckpoint, load_checkpoint
from diffusion.utils.atomic import atomic_save_json

log = logging.getLogger(__name__)
METRICS = ("nll", "fid")


def datamodule_for(cfg: DictConfig, loaded: LoadedCheckpoint):
    """The run's DataModule (or ``data=...`` given here), without augmentation."""
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
    datamodule = hydra.utils.instantiate(data_cfg)
    datamodule.setup()  # builds every split
    return datamodule


def split_loader(datamodule, split: str):
    loaders = {"train": datamodule.train_dataloader, "val": datamodule.val_dataloader,
               "test": datamodule.test_dataloader}
    if split not in loaders:
        raise ValueError(f"split={split!r} is not one of {sorted(loaders)}")
    return loaders[split]()


def nll(cfg: DictConfig, loaded: LoadedCheckpoint, device: torch.device) -> dict[str, Any]:
    datamodule = datamodule_for(cfg, loaded)
    loader = split_loader(datamodule, cfg.split)
    total = len(loader.dataset) if cfg.max_batches is None else min(len(loader.dataset), cfg.max_batches * cfg.batch_size)
    model_kwargs_fn = (lambda y: {"y": y}) if loaded.num_classes is not None else None
    with torch.inference_mode(), images_progress(total, 0, f"bits/dim ({cfg.split})", enabled=cfg.progress) as advance:
        results = evaluate_bpd(
            loaded.diffusion, autocast_network(loaded.model.to(device), device, cfg.precision), loader,
            clip_denoised=cfg.clip_denoised, model_kwargs_fn=model_kwargs_fn, progress=advance,
            max_batches=cfg.max_batches, respacing=cfg.respacing,
            generator=batch_generator(cfg.seed, 0, device),
        )
    log.info("%s bits/dim: %.4f (prior %.2e, decoder %.4f) over %d images",
             cfg.split, results["bpd"], results["prior_bpd"], results["decoder_bpd"], results["num_images"])
    return results


def fid(cfg: DictConfig, loaded: LoadedCheckpoint, device: torch.device) -> dict[str, Any]:
    samples = cfg.samples or draw_samples(cfg)
    if not os.path.isfile(samples):
        raise FileNotFoundError(f"samples file not found: {samples}")
    datamodule_cfg = cfg.get("data") or loaded.config.get("data") or {}
    is_digits = str(datamodule_cfg.get("_target_", "")).endswith("DigitsDataModule")
    if is_digits:
        extractor = DigitsFeatureExtractor.load_or_fit(cfg.cache_dir)
        evaluator = FIDEvaluator(extractor, cache_dir=cfg.cache_dir, device=device)
        results = evaluator(samples, dataset="digits", split="train", real_batches=lambda: [digits_images("train")])
    else:
        evaluator = FIDEvaluator(inception_weights=cfg.inception_weights, cache_dir=cfg.cache_dir, device=device)

        def real_batches():
            datamodule = datamodule_for(cfg, loaded)
            return split_loader(datamodule, "train")

        name = datamodule_cfg.get("_target_", "data").rsplit(".", 1)[-1]
        results = evaluator(samples, dataset=f"{name}-{datamodule_cfg.get('image_size', loaded.image_shape[-1])}",
                            split="train", real_batches=real_batches)
    results["samples"] = samples
    log.info("%s", ", ".join(f"{k}: {v:.4f}" for k, v in results.items() if isinstance(v, float)))
    return results


def draw_samples(cfg: DictConfig) -> str:
    from diffusion.jobs.sample import sample  # the sample job, with this config's sampler

    sample_cfg = OmegaConf.create({
        "ckpt": cfg.ckpt, "num_samples": cfg.num_samples, "batch_size": cfg.batch_size, "seed": cfg.seed,
        "weights": cfg.weights, "class_labels": None, "clip_denoised": cfg.clip_denoised, "device": cfg.device,
        "num_devices": cfg.num_devices, "precision": cfg.precision, "grid_size": 64, "progress": cfg.progress,
        "output_dir": cfg.output_dir, "sampler": OmegaConf.to_container(cfg.sampler),
    })
    return sample(sample_cfg)["npz"]


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    if cfg.metric not in METRICS:
        raise ValueError(f"metric={cfg.metric!r} is not one of {list(METRICS)}")
    loaded = load_checkpoint(cfg.ckpt, weights=cfg.weights)
    device = torch.device(resolve_devices(cfg.device)[0])
    results = {"nll": nll, "fid": fid}[cfg.metric](cfg, loaded, device)
    results.update(ckpt=os.path.abspath(cfg.ckpt), weights=loaded.weights, metric=cfg.metric,
                   global_step=loaded.global_step)
    path = os.path.join(cfg.output_dir, f"{cfg.metric}.json")
    atomic_save_json(path, results)
    log.info("wrote %s", path)
    return results
