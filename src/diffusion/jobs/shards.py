"""The sample job's finished batches, kept as shard files so that a killed job resumes.

A shard folder (``samples_NxHxWxC_shards/`` beside the npz) holds ``batch_%06d.npz`` files
and ``manifest.json``, the key of everything that decides their images, written atomically
before the first shard. A job that finds shards of another key refuses to mix them with its
own (`ShardsMismatchError`, naming what differs) rather than silently keying a new folder by
a hash: the user resumed into this folder on purpose, so a changed setting is most likely
a mistake worth hearing about, and a hashed folder would leave the old shards behind
unseen and write the new npz over the old one's name. Without finished shards the folder
is simply taken over.

What decides batch i's images, hence the key:

- the network: a SHA-256 of the chosen weights' bytes (so ``weights=``, ``ema_std=`` and a
  checkpoint rewritten in place are covered; ``ema_std``, the σ_rel of post-hoc EMA weights,
  is in the key by name too, where set) and of the run config's model, diffusion and data shape.
  Not the checkpoint's path or mtime: the same weights at another path give the same
  images, and a copied or touched file changes nothing;
- ``seed`` and ``batch_size`` (batch i draws everything from the generator (seed, i));
  ``num_samples`` (the last batch's size; it also names the folder);
- the sampler's settings, ``clip_denoised``, ``precision``, ``class_labels``, and ``compile``
  where set (compiled kernels round differently);
- a super-resolution model's inputs: ``low_res`` by name and a SHA-256 of the images (and,
  with ``class_labels=input``, labels) read from it;
- the device type: the same seed gives other noise on a CUDA device than on the CPU.

Not: ``num_devices`` or which GPU (batch i is the same wherever it runs), ``grid_size``,
``progress``, ``output_dir``. The software (torch version) is not in the key either.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from diffusion.checkpoint import LoadedCheckpoint
from diffusion.utils.atomic import atomic_save_json, remove_stale_temporaries
from diffusion.utils.errors import UserError

MANIFEST = "manifest.json"
FORMAT = 1
# Key entries that are digests, and what they stand for in a message.
DIGESTS = {"weights_sha256": "the checkpoint's weights", "network_sha256": "the checkpoint's model or process"}


class ShardsMismatchError(UserError):
    """A shard folder holds finished batches of a run with other settings."""


def shard_path(shard_dir: str, index: int) -> str:
    return os.path.join(shard_dir, f"batch_{index:06d}.npz")


def finished_shards(shard_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(shard_dir), "batch_*.npz")))


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor of ``model``'s state dict: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)  # any shape -> (numel,)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy())  # the raw bytes, whatever the dtype
    return digest.hexdigest()


def shard_key(cfg: DictConfig, loaded: LoadedCheckpoint, device_type: str,
              conditioning_sha256: str | None = None) -> dict[str, Any]:
    """Everything that decides the shards' images (see the module docstring), as plain values;
    ``conditioning_sha256``: `diffusion.jobs.superres.conditioning_digest` of the inputs read."""
    labels = cfg.class_labels
    labels = OmegaConf.to_container(labels) if OmegaConf.is_config(labels) else labels
    network = {key: loaded.config.get(key) for key in ("model", "diffusion")}
    network.update(image_shape=list(loaded.image_shape), num_classes=loaded.num_classes,
                   null_label=getattr(loaded.model, "null_label", None))
    key = {
        "weights_sha256": weights_digest(loaded.model),
        "network_sha256": hashlib.sha256(json.dumps(_plain(network), sort_keys=True).encode()).hexdigest(),
        "seed": cfg.seed, "batch_size": cfg.batch_size, "num_samples": cfg.num_samples,
        "sampler": OmegaConf.to_container(cfg.sampler, resolve=True), "clip_denoised": cfg.clip_denoised,
        "precision": str(cfg.precision), "class_labels": labels, "device_type": device_type,
    }
    if cfg.get("ema_std") is not None:  # absent otherwise: the manifests of earlier versions still match
        key["ema_std"] = cfg.ema_std
    if cfg.get("low_res") is not None:  # super-resolution inputs, likewise absent otherwise
        key["low_res"] = str(cfg.low_res)
    if conditioning_sha256 is not None:  # what was read from them (a file or split can change)
        key["conditioning_sha256"] = conditioning_sha256
    if cfg.get("compile"):  # compiled kernels round differently; likewise absent otherwise
        key["compile"] = True
    return _plain(key)


def open_shard_dir(shard_dir: str, key: dict[str, Any], ckpt: str) -> int:
    """Make ``shard_dir`` this run's: refuse finished shards of another key, else (re)write
    the manifest. Returns how many finished shards there are. Hold the output folder's lock."""
    os.makedirs(shard_dir, exist_ok=True)
    remove_stale_temporaries(shard_dir)  # of shards (or a manifest) whose writer was killed
    finished = finished_shards(shard_dir)
    manifest_path = os.path.join(shard_dir, MANIFEST)
    previous = _read_manifest(manifest_path)
    if previous is not None and previous.get("key") == key:
        return len(finished)
    if finished:
        raise ShardsMismatchError(
            f"{shard_dir} holds {len(finished)} finished batch(es) of another run "
            f"({describe_differences(previous, key)}), which would mix with this run's images; "
            f"rerun with that run's settings to finish it, pass another output_dir, or delete {shard_dir}"
        )
    atomic_save_json(manifest_path, {"format": FORMAT, "key": key, "ckpt": os.path.abspath(ckpt)})
    return 0


def remove_shard_dir(shard_dir: str) -> None:
    """Remove the shards, then the manifest and the folder (the npz holds them all now)."""
    for path in finished_shards(shard_dir):
        os.remove(path)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(shard_dir, MANIFEST))
    with contextlib.suppress(OSError):
        os.rmdir(shard_dir)


def describe_differences(previous: dict[str, Any] | None, key: dict[str, Any]) -> str:
    if previous is None or not isinstance(previous.get("key"), dict):
        return "it has no readable manifest: written by an older version or damaged"
    return "differs in " + ", ".join(_changes(previous["key"], key))


def _changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``name old -> new`` for each entry that differs (``sampler.steps 3 -> 4`` inside a dict)."""
    parts = []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            parts += _changes(before, after, f"{prefix}{name}.")
        elif name in DIGESTS:
            parts.append(DIGESTS[name])
        else:
            parts.append(f"{prefix}{name} {_short(before)} -> {_short(after)}")
    return parts


def _read_manifest(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _plain(value: Any) -> Any:
    """JSON's view of ``value`` (tuples become lists, DictConfigs dicts), so that a key
    compares equal to itself read back from the manifest."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[: width - 3] + "..."
