"""Convert improved-diffusion (and guided-diffusion) UNet checkpoints.

``from_improved_diffusion(state_dict, **flags)`` builds a `diffusion.nets.unet.UNet` from
improved-diffusion's flag names and loads the weights strictly. Our module layout mirrors
theirs (``input_blocks`` / ``middle_block`` / ``output_blocks`` / ``out``, ``time_embed``,
``label_emb``), so the key map is the identity except for:

- a ``module.`` prefix (a state dict saved from a DistributedDataParallel wrapper) is dropped;
- guided-diffusion's ``use_new_attention_order=True`` lays the ``qkv`` rows out as
  (q|k|v, head, channel); they are permuted to the head-major (head, q|k|v, channel)
  layout of improved-diffusion's ``QKVAttention``, which our ``AttentionBlock`` reads.

Given the same weights the converted model computes the same function.

Command line (improved-diffusion's model and diffusion flags, same names and defaults)::

    python -m diffusion.convert IN.pt OUT.ckpt --image_size 32 --num_channels 128 \\
        --num_res_blocks 3 --learn_sigma True --dropout 0.3 --diffusion_steps 4000 \\
        --noise_schedule cosine --use_kl False --predict_xstart False \\
        --rescale_timesteps True --rescale_learned_sigmas True

writes (``torch.save``, atomically: a temporary file in the same folder, then ``os.replace``)::

    {
      "state_dict": {"model." + key: tensor, ...},          # the UNet's state dict
      "hyper_parameters": {"config": {
        "model": {"_target_": "diffusion.nets.unet.UNet", **UNet keyword arguments},
        "diffusion": {
          "_target_": "diffusion.process.gaussian_diffusion.GaussianDiffusion",
          "betas": {"_target_": "diffusion.process.schedules.get_named_beta_schedule",
                    "schedule_name": "linear" | "cosine", "num_diffusion_timesteps": T},
          "model_mean_type": "epsilon" | "start_x",
          "model_var_type": "fixed_large" | "fixed_small" | "learned_range",
          "loss_type": "mse" | "rescaled_mse" | "rescaled_kl",
          "rescale_timesteps": bool},
        "data": {"image_size": int, "channels": 3, "num_classes": 1000 | None}}},
      "converted_from": "improved-diffusion",
    }

The diffusion choices follow improved-diffusion's ``create_gaussian_diffusion``:
use_kl → rescaled_kl, else rescale_learned_sigmas → rescaled_mse, else mse;
predict_xstart → start_x, else epsilon; learn_sigma → learned_range, else sigma_small →
fixed_small, else fixed_large. ``timestep_respacing`` is a sampling choice and is not stored
(pick a sampler at sampling time); ``use_fp16`` is accepted and ignored (weights are stored
in float32).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from collections.abc import Mapping

import torch

from diffusion.nets.blocks import AttentionBlock
from diffusion.nets.unet import UNet, default_channel_mult

NUM_CLASSES = 1000  # improved-diffusion's script_util: class_cond means ImageNet's 1000 classes

# improved-diffusion's model flags and defaults (script_util.model_and_diffusion_defaults),
# plus guided-diffusion's channel_mult, num_head_channels, resblock_updown,
# use_new_attention_order and use_fp16.
MODEL_FLAG_DEFAULTS: dict[str, object] = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "attention_resolutions": "16,8",
    "dropout": 0.0,
    "learn_sigma": False,
    "class_cond": False,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
    "channel_mult": "",
    "num_head_channels": -1,
    "resblock_updown": False,
    "use_new_attention_order": False,
    "use_fp16": False,
}
DIFFUSION_FLAG_DEFAULTS: dict[str, object] = {
    "sigma_small": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "timestep_respacing": "",
    "use_kl": False,
    "predict_xstart": False,
    "rescale_timesteps": True,
    "rescale_learned_sigmas": True,
}
FLAG_DEFAULTS = {**MODEL_FLAG_DEFAULTS, **DIFFUSION_FLAG_DEFAULTS}


def resolve_flags(flags: Mapping[str, object]) -> dict[str, object]:
    """improved-diffusion's defaults updated with ``flags``; unknown names are an error."""
    unknown = sorted(set(flags) - set(FLAG_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown improved-diffusion flag(s) {unknown}; valid flags: {sorted(FLAG_DEFAULTS)}"
        )
    return {**FLAG_DEFAULTS, **flags}


def _ints(value: object) -> list[int]:
    """A comma string ("16,8") or a sequence of ints -> list of ints."""
    if isinstance(value, str):
        return [int(v) for v in value.split(",") if v.strip()]
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]  # type: ignore[union-attr]


def unet_kwargs_from_flags(**flags: object) -> dict[str, object]:
    """Our UNet's keyword arguments for improved-diffusion's ``create_model`` flags.

    improved-diffusion's ``attention_resolutions`` are already pixel sizes on its command line
    (it converts them to downsampling rates internally), which is what our UNet takes.
    An empty ``channel_mult`` is derived from ``image_size`` as their script_util does.
    """
    f = resolve_flags(flags)
    image_size = int(f["image_size"])
    channel_mult = _ints(f["channel_mult"]) or list(default_channel_mult(image_size))
    return {
        "image_size": image_size,
        "in_channels": 3,
        "model_channels": int(f["num_channels"]),
        "out_channels": 6 if f["learn_sigma"] else 3,
        "num_res_blocks": int(f["num_res_blocks"]),
        "attention_resolutions": _ints(f["attention_resolutions"]),
        "dropout": float(f["dropout"]),
        "channel_mult": channel_mult,
        "conv_resample": True,
        "num_classes": NUM_CLASSES if f["class_cond"] else None,
        "use_checkpoint": bool(f["use_checkpoint"]),
        "num_heads": int(f["num_heads"]),
        "num_head_channels": int(f["num_head_channels"]),
        "num_heads_upsample": int(f["num_heads_upsample"]),
        "use_scale_shift_norm": bool(f["use_scale_shift_norm"]),
        "resblock_updown": bool(f["resblock_updown"]),
    }


def diffusion_config_from_flags(**flags: object) -> dict[str, object]:
    """Our GaussianDiffusion config for improved-diffusion's ``create_gaussian_diffusion`` flags."""
    f = resolve_flags(flags)
    if f["timestep_respacing"]:
        warnings.warn(
            f"timestep_respacing={f['timestep_respacing']!r} is a sampling choice and is not "
            "stored; choose the sampler and its steps when sampling",
            stacklevel=2,
        )
    if f["use_kl"]:
        loss_type = "rescaled_kl"
    elif f["rescale_learned_sigmas"]:
        loss_type = "rescaled_mse"
    else:
        loss_type = "mse"
    if f["learn_sigma"]:
        var_type = "learned_range"
    else:
        var_type = "fixed_small" if f["sigma_small"] else "fixed_large"
    return {
        "_target_": "diffusion.process.gaussian_diffusion.GaussianDiffusion",
        "betas": {
            "_target_": "diffusion.process.schedules.get_named_beta_schedule",
            "schedule_name": str(f["noise_schedule"]),
            "num_diffusion_timesteps": int(f["diffusion_steps"]),
        },
        "model_mean_type": "start_x" if f["predict_xstart"] else "epsilon",
        "model_var_type": var_type,
        "loss_type": loss_type,
        "rescale_timesteps": bool(f["rescale_timesteps"]),
    }


def build_config(**flags: object) -> dict[str, object]:
    """The plain-dict run config (``model``, ``diffusion``, ``data``) for the flags."""
    model = unet_kwargs_from_flags(**flags)
    return {
        "model": {"_target_": "diffusion.nets.unet.UNet", **model},
        "diffusion": diffusion_config_from_flags(**flags),
        "data": {
            "image_size": model["image_size"],
            "channels": model["in_channels"],
            "num_classes": model["num_classes"],
        },
    }


def _qkv_new_to_legacy(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Permute qkv rows from (q|k|v, head, ch) to the head-major (head, q|k|v, ch) layout."""
    rows = tensor.shape[0]
    rest = tensor.shape[1:]
    per_head = rows // (3 * num_heads)
    t = tensor.reshape(3, num_heads, per_head, *rest)  # (3C, ...) -> (3, heads, d, ...)
    return t.transpose(0, 1).reshape(rows, *rest)  # (heads, 3, d, ...) -> (3C, ...)


def map_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: UNet, use_new_attention_order: bool = False
) -> dict[str, torch.Tensor]:
    """improved-diffusion keys -> ours (identity, see the module docstring)."""
    sd = dict(state_dict)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if use_new_attention_order:
        for name, module in model.named_modules():
            if isinstance(module, AttentionBlock):
                for suffix in ("weight", "bias"):
                    key = f"{name}.qkv.{suffix}"
                    if key in sd:
                        sd[key] = _qkv_new_to_legacy(sd[key], module.num_heads)
    return sd


def _check_keys(sd: Mapping[str, torch.Tensor], model: UNet) -> None:
    """Raise a ValueError that lists missing, unexpected and mis-shaped keys, if any."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mis_shaped = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(sd) & set(expected))
        if tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or mis_shaped):
        return

    def listing(title: str, items: list[str]) -> str:
        shown = "\n    ".join(items[:20])
        more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
        return f"\n  {title} ({len(items)}):\n    {shown}{more}" if items else ""

    raise ValueError(
        "the checkpoint does not fit the UNet built from these flags; check that image_size, "
        "num_channels, num_res_blocks, channel_mult, attention_resolutions, learn_sigma, "
        "class_cond, num_heads/num_head_channels and resblock_updown match the training run"
        + listing("missing keys", missing)
        + listing("unexpected keys", unexpected)
        + listing("shape mismatches", mis_shaped)
    )


def from_improved_diffusion(state_dict: Mapping[str, torch.Tensor], **model_flags: object) -> UNet:
    """Build our UNet from improved-diffusion flags and load its ``state_dict`` strictly.

    Args:
        state_dict: the dict in an improved-diffusion ``model*.pt`` / ``ema_*.pt`` file.
        **model_flags: improved-diffusion flag names (see ``MODEL_FLAG_DEFAULTS``; missing
            ones take their defaults). Diffusion flags are accepted too and ignored here, so
            the whole ``args_to_dict(args, model_and_diffusion_defaults().keys())`` can be passed.

    Returns:
        The loaded UNet (float32, in train mode as ``nn.Module``s start).
    """
    flags = resolve_flags(model_flags)
    model = UNet(**unet_kwargs_from_flags(**flags))
    sd = map_state_dict(state_dict, model, bool(flags["use_new_attention_order"]))
    _check_keys(sd, model)
    model.load_state_dict(sd, strict=True)
    return model


def save_checkpoint(model: UNet, config: dict, path: str | os.PathLike) -> None:
    """Write the converted checkpoint (layout in the module docstring) atomically."""
    checkpoint = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"config": config},
        "converted_from": "improved-diffusion",
    }
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".convert-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def str2bool(value: str) -> bool:
    """improved-diffusion's boolean flag parsing: yes/true/t/y/1 and no/false/f/n/0."""
    lowered = value.lower()
    if lowered in ("yes", "true", "t", "y", "1"):
        return True
    if lowered in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected (true/false), got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffusion.convert",
        description="Convert an improved-diffusion UNet checkpoint into this project's format.",
    )
    parser.add_argument("input", help="improved-diffusion model*.pt or ema_*.pt state dict")
    parser.add_argument("output", help="checkpoint to write (e.g. converted.ckpt)")
    for name, default in FLAG_DEFAULTS.items():
        kind = str2bool if isinstance(default, bool) else type(default)
        metavar = "BOOL" if kind is str2bool else kind.__name__.upper()
        parser.add_argument(f"--{name}", default=default, type=kind, metavar=metavar)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``python -m diffusion.convert IN.pt OUT.ckpt --flags``."""
    args = vars(build_parser().parse_args(argv))
    input_path, output_path = args.pop("input"), args.pop("output")
    state_dict = torch.load(input_path, map_location="cpu", weights_only=True)
    model = from_improved_diffusion(state_dict, **args)
    save_checkpoint(model, build_config(**args), output_path)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {output_path}: UNet with {num_params:,} parameters", file=sys.stderr)


if __name__ == "__main__":
    main()
