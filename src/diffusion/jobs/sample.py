"""`sample(cfg)`: draw samples from a checkpoint into an npz and a PNG grid.

Work is cut into batches, and batch ``i`` draws all its randomness (noise, labels) from a
generator seeded with ``(seed, i)``: the same seed gives the same images whatever the
batch-to-device assignment, several devices split the batches without sharing a seed,
and finished batches are kept as shard files, so an interrupted job resumes where it was.
The final ``samples_NxHxWxC.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` labels for
class-conditional models: the format of guided-diffusion's evaluation suite) and the grid
are written atomically. Classifier-free guidance is the sampler's ``guidance_scale``; the
job passes the UNet's null label beside the labels (``model_kwargs["null_label"]``, see
`diffusion.sampling.guidance`), and ``arr_1`` holds the labels guided towards. A
super-resolution checkpoint takes its low-resolution images from ``low_res`` (an npz, a
folder, or ``split:NAME`` of the run's dataset; `diffusion.jobs.superres`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import hydra
import numpy as np
import torch
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusion.checkpoint import LoadedCheckpoint, load_checkpoint, load_posthoc_ema
from diffusion.jobs.checks import (
    build_sampler,
    check_class_labels,
    check_sample_settings,
    check_sampler,
)
from diffusion.jobs.common import (
    autocast_network,
    batch_generator,
    images_progress,
    resolve_devices,
)
from diffusion.jobs.shards import open_shard_dir, remove_shard_dir, shard_key, shard_path
from diffusion.jobs.superres import conditioning_digest, cycled_batch, read_conditioning
from diffusion.sampling import Sampler
from diffusion.sampling.guidance import NULL_LABEL_KEY
from diffusion.utils.atomic import atomic_savez, remove_stale_temporaries
from diffusion.utils.checks import UnwritableError, require_writable_dir
from diffusion.utils.errors import ConfigError
from diffusion.utils.host_memory import retain_freed_memory
from diffusion.utils.images import save_image_grid, to_uint8
from diffusion.utils.lock import folder_lock

log = logging.getLogger(__name__)


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW floats -> uint8 NHWC, rounding as improved-diffusion's sampler does."""
    return to_uint8(images).permute(0, 2, 3, 1).contiguous().cpu().numpy()  # (B, C, H, W) -> (B, H, W, C)


def batch_labels(cfg: DictConfig, loaded: LoadedCheckpoint, index: int, size: int,
                 generator: torch.Generator, input_labels: torch.Tensor | None = None) -> torch.Tensor | None:
    """Labels of batch ``index``: given ones cycled in order, uniformly random, or (``input``)
    the labels of the low-resolution images, cycled as they are. (The job checked the given
    ones against the checkpoint's classes: `check_class_labels`.)"""
    if loaded.num_classes is None:
        return None
    if input_labels is not None:
        return cycled_batch(input_labels, index * cfg.batch_size, size, generator.device)
    if cfg.class_labels is None:
        return torch.randint(0, loaded.num_classes, (size,), generator=generator, device=generator.device)
    given = [cfg.class_labels] if isinstance(cfg.class_labels, int) else list(cfg.class_labels)
    start = index * cfg.batch_size
    return torch.tensor([given[(start + j) % len(given)] for j in range(size)], device=generator.device)


def sample_batch(cfg: DictConfig, loaded: LoadedCheckpoint, sampler, index: int, size: int,
                 device: torch.device, low_res: torch.Tensor | None = None,
                 input_labels: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    generator = batch_generator(cfg.seed, index, device)
    labels = batch_labels(cfg, loaded, index, size, generator, input_labels)
    if low_res is not None:  # a super-resolution model (diffusion.jobs.superres)
        low_res = cycled_batch(low_res, index * cfg.batch_size, size, device)
    images = draw_batch(cfg, loaded, sampler, generator, size, device, labels, low_res)
    out = {"arr_0": to_uint8_nhwc(images)}
    if labels is not None:
        out["arr_1"] = labels.cpu().numpy().astype(np.int64)
    return out


def draw_batch(cfg: DictConfig, loaded: LoadedCheckpoint, sampler, generator: torch.Generator, size: int,
               device: torch.device, labels: torch.Tensor | None, low_res: torch.Tensor | None) -> torch.Tensor:
    """``size`` samples as [-1, 1] floats on ``device``, drawn from ``generator``, given the
    class ``labels`` (with the null label beside them, for guidance) and a super-resolution
    model's ``low_res`` as model kwargs. edit.py ``task=superres`` samples through here too."""
    model_kwargs = {} if labels is None else {"y": labels, NULL_LABEL_KEY: null_label(loaded)}
    if low_res is not None:
        model_kwargs["low_res"] = low_res
    model = autocast_network(loaded.model, device, cfg.precision)
    with torch.inference_mode():
        return sampler(
            loaded.diffusion, model, shape=(size, *loaded.image_shape), model_kwargs=model_kwargs,
            clip_denoised=cfg.clip_denoised, generator=generator,
        )


def null_label(loaded: LoadedCheckpoint) -> int | None:
    """The UNet's "no label" index (a model trained with label dropout), else None."""
    return getattr(loaded.model, "null_label", None)


def batch_sizes(num_samples: int, batch_size: int) -> list[int]:
    full, rest = divmod(num_samples, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def run_batches(rank: int, cfg_yaml: str, devices: list[str], shard_dir: str, progress_queue=None,
                loaded: LoadedCheckpoint | None = None, sampler: Sampler | None = None,
                conditioning: tuple[torch.Tensor | None, torch.Tensor | None] | None = None) -> None:
    """Worker: the batches ``rank, rank + n, ...`` on ``devices[rank]``, each saved as a shard.
    A worker process loads the checkpoint, builds the sampler and reads the super-resolution
    inputs (`read_conditioning`) itself; in the job's own process they are passed in."""
    # glibc keeps the memory freed after each batch for the next one instead of returning it
    # to the kernel (utils/host_memory.py): on 2 CPU cores a 1000-image DDIM-50 run spent 5.3 s
    # of its 20 s in page faults without it (bench/results.md). Always, unlike train.py's
    # retain_freed_memory key: a job's process ends with the job, and its peak with it.
    retain_freed_memory()
    cfg = OmegaConf.create(cfg_yaml)
    device = torch.device(devices[rank])
    if loaded is None:
        loaded = load_chosen_weights(cfg)
    if sampler is None:
        sampler = hydra.utils.instantiate(cfg.sampler)
    loaded.model.to(device)
    compiled = getattr(loaded.model, "_compiled_call_impl", None) is not None  # what nn.Module.compile sets
    if cfg.compile and not compiled:
        loaded.model.compile()  # in place: the first batch compiles
    elif compiled and not cfg.compile:  # the shard key would say eager
        raise ValueError("compile=false, but the network was compiled by an earlier compile=true job in this "
                         "process: load the checkpoint again")
    low_res, input_labels = conditioning or read_conditioning(cfg, loaded)
    for index, size in enumerate(batch_sizes(cfg.num_samples, cfg.batch_size)):
        if index % len(devices) != rank or os.path.exists(shard_path(shard_dir, index)):
            continue
        arrays = sample_batch(cfg, loaded, sampler, index, size, device, low_res, input_labels)
        with explain_write_failure(shard_path(shard_dir, index), shard_dir):
            atomic_savez(shard_path(shard_dir, index), **arrays)
        if progress_queue is not None:
            progress_queue.put(size)


def merge_shards(shard_dir: str, count: int) -> dict[str, np.ndarray]:
    parts = [np.load(shard_path(shard_dir, i)) for i in range(count)]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0].files}


def output_paths(cfg: DictConfig, image_shape: tuple[int, int, int]) -> tuple[str, str, str]:
    channels, height, width = image_shape
    stem = f"samples_{cfg.num_samples}x{height}x{width}x{channels}"
    out_dir = os.path.expanduser(cfg.output_dir)
    return (os.path.join(out_dir, f"{stem}.npz"), os.path.join(out_dir, f"{stem}.png"),
            os.path.join(out_dir, f"{stem}_shards"))


def sample(cfg: DictConfig, loaded: LoadedCheckpoint | None = None) -> dict[str, Any]:
    """Run the job; returns the paths written, the number of images, the weights, the sampler's
    config and its NFE. ``loaded``: the
    checkpoint ``cfg.ckpt`` already loaded with ``cfg.weights`` (the evaluate job's).
    The output folder is locked for the run (`diffusion.utils.lock`): a second job writing
    there is refused at once."""
    loaded, sampler, devices, conditioning = prepare(cfg, loaded)
    npz_path, grid_path, shard_dir = output_paths(cfg, loaded.image_shape)
    require_writable_dir("output_dir", cfg.output_dir)
    with folder_lock(cfg.output_dir):
        remove_stale_temporaries(os.path.dirname(npz_path), [os.path.basename(npz_path), os.path.basename(grid_path)])
        key = shard_key(cfg, loaded, torch.device(devices[0]).type, conditioning_digest(*conditioning))
        open_shard_dir(shard_dir, key, cfg.ckpt)
        sizes = batch_sizes(cfg.num_samples, cfg.batch_size)
        done = sum(s for i, s in enumerate(sizes) if os.path.exists(shard_path(shard_dir, i)))
        if done:
            log.info("resuming: %d of %d images already in %s", done, cfg.num_samples, shard_dir)
        cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        with images_progress(cfg.num_samples, done, "sampling", enabled=cfg.progress) as advance:
            if len(devices) == 1:
                queue = _CallbackQueue(advance)
                run_batches(0, cfg_yaml, devices, shard_dir, queue, loaded=loaded, sampler=sampler,
                            conditioning=conditioning)
            else:
                _run_on_devices(cfg_yaml, devices, shard_dir, advance)
        arrays = merge_shards(shard_dir, len(sizes))
        write_outputs(arrays, npz_path, grid_path, cfg.grid_size, shard_dir)
        remove_shard_dir(shard_dir)
    log.info("wrote %s (%d images, %s weights) and %s", npz_path, len(arrays["arr_0"]), loaded.weights, grid_path)
    return {"npz": npz_path, "grid": grid_path, "num_images": int(len(arrays["arr_0"])), "weights": loaded.weights,
            "sampler": OmegaConf.to_container(cfg.sampler, resolve=True),
            "nfe": sampler.num_function_evals(loaded.diffusion.num_timesteps)}  # model calls per batch


def prepare(cfg: DictConfig, loaded: LoadedCheckpoint | None = None
            ) -> tuple[LoadedCheckpoint, Sampler, list[str], tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Check every setting, load the checkpoint, build the sampler and read a super-resolution
    model's inputs: all that the user's input can fail, before anything is written. Returns
    (checkpoint, sampler, devices, (low_res, input labels) as `read_conditioning` gives them)."""
    check_sample_settings(cfg)
    devices = resolve_devices(cfg.device, cfg.num_devices)
    # a bad sampler setting fails before the checkpoint is read; sampler=student needs it read
    sampler = None if cfg.sampler.get("from_checkpoint") else build_sampler(cfg.sampler)
    if loaded is None:
        loaded = load_chosen_weights(cfg)
    if sampler is None:
        use_checkpoint_sampler(cfg, loaded)
        sampler = build_sampler(cfg.sampler)
    check_sampler(sampler, cfg.sampler, loaded, null_label(loaded))  # e.g. more steps than T
    check_class_labels(cfg.class_labels, loaded.num_classes)
    conditioning = read_conditioning(cfg, loaded)  # a missing or wrong-sized input fails before anything is written
    return loaded, sampler, devices, conditioning


def use_checkpoint_sampler(cfg: DictConfig, loaded: LoadedCheckpoint) -> None:
    """``sampler=student``: put the sampler a distilled checkpoint was trained for (its step
    count and grid) in ``cfg.sampler``, so that the shard key and the workers see it."""
    named = (loaded.distilled or {}).get("sampler")
    if not named:
        raise ConfigError(
            f"sampler=student: {cfg.ckpt} names no sampler (it is not a student of distill.py); "
            f"choose one, e.g. sampler=ddim50 or sampler=unipc10"
        )
    named = dict(named)
    steps = cfg.sampler.get("steps")
    if steps is not None:
        # A consistency model maps any noise level to the data, so it samples in any number of
        # calls (Song et al. 2023, Alg. 1); a progressive student learned one grid's steps only.
        if not named["_target_"].endswith("ConsistencySampler"):
            raise ConfigError(
                f"sampler.steps={steps}: {cfg.ckpt} is a progressive student, distilled for its "
                f"{named['steps']} steps only; remove sampler.steps (only consistency students take it)"
            )
        named["steps"] = steps  # the sampler's constructor checks it (build_sampler)
    with open_dict(cfg):
        cfg.sampler = OmegaConf.create(named)


def load_chosen_weights(cfg: DictConfig) -> LoadedCheckpoint:
    """``cfg.ckpt`` with the weights that ``weights`` chooses or, when ``ema_std`` (a σ_rel)
    is set, the post-hoc EMA of that width rebuilt from the run's snapshots (`load_posthoc_ema`)."""
    loaded = load_checkpoint(cfg.ckpt, weights=cfg.weights)
    if cfg.get("ema_std") is not None:
        loaded = load_posthoc_ema(loaded, cfg.ckpt, cfg.ema_std)
    return loaded


def write_outputs(arrays: dict[str, np.ndarray], npz_path: str, grid_path: str, grid_size: int,
                  shard_dir: str) -> None:
    """The npz and its grid, both or neither: when a write fails (a full disk) the npz just
    written is removed again, and the shards stay for a rerun to finish from."""
    with explain_write_failure(npz_path, shard_dir):
        atomic_savez(npz_path, **arrays)
    grid = torch.from_numpy(arrays["arr_0"][:grid_size]).permute(0, 3, 1, 2).float() / 127.5 - 1  # NHWC -> NCHW
    try:
        with explain_write_failure(grid_path, shard_dir):
            save_image_grid(grid, grid_path)
    except UnwritableError:
        with contextlib.suppress(OSError):
            os.remove(npz_path)
        raise


@contextlib.contextmanager
def explain_write_failure(path: str, shard_dir: str):
    """An OSError while writing ``path`` (no space, a read-only folder) as an
    `UnwritableError` that says the finished shards are kept and how to go on."""
    try:
        yield
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise UnwritableError(
            f"writing {path} failed ({reason}); "
            f"the finished batches are kept in {shard_dir}: free space (or fix the folder) and rerun "
            "the same command to finish"
        ) from err


class _CallbackQueue:
    def __init__(self, callback):
        self.callback = callback

    def put(self, value: int) -> None:
        self.callback(value)


def _run_on_devices(cfg_yaml: str, devices: list[str], shard_dir: str, advance) -> None:
    context = mp.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=run_batches, args=(rank, cfg_yaml, devices, shard_dir, queue))
               for rank in range(len(devices))]
    for worker in workers:
        worker.start()
    while any(w.is_alive() for w in workers) or not queue.empty():
        with contextlib.suppress(Exception):
            advance(queue.get(timeout=0.5))
    failed = [w.exitcode for w in workers if w.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} sampling worker(s) failed (exit codes {failed}); finished shards are kept")
