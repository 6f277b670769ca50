"""``python -m diffusion.convert IN.pt OUT.ckpt --flags``: an improved-diffusion checkpoint
as a checkpoint of this project, which sample.py and evaluate.py read like any other.

Flags are improved-diffusion's model and diffusion flags, with the same names and defaults::

    python -m diffusion.convert IN.pt OUT.ckpt --image_size 32 --num_channels 128 \\
        --num_res_blocks 3 --learn_sigma True --dropout 0.3 --diffusion_steps 4000 \\
        --noise_schedule cosine --use_kl False --predict_xstart False \\
        --rescale_timesteps True --rescale_learned_sigmas True

The weights are mapped by `diffusion.nets.convert.from_improved_diffusion`; the checkpoint
is written atomically in the layout of `diffusion.checkpoint`, with a run config whose
``model`` is the UNet's keyword arguments and whose ``diffusion`` follows improved-
diffusion's ``create_gaussian_diffusion``: use_kl → rescaled_kl, else rescale_learned_sigmas →
rescaled_mse, else mse; predict_xstart → start_x, else epsilon; learn_sigma → learned_range,
else sigma_small → fixed_small, else fixed_large. ``timestep_respacing`` is a sampling choice
and is not stored (pick a sampler at sampling time); ``use_fp16`` is accepted and ignored
(weights are stored in float32).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

from diffusion.checkpoint import checkpoint_dict, save_checkpoint
from diffusion.nets.convert import (
    FLAG_DEFAULTS,
    from_improved_diffusion,
    resolve_flags,
    unet_kwargs_from_flags,
)
from diffusion.nets.unet import UNet

__all__ = ["build_config", "diffusion_config_from_flags", "from_improved_diffusion", "main",
           "unet_kwargs_from_flags", "write_converted"]


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


def write_converted(model: UNet, config: dict, path: str | os.PathLike) -> None:
    """Write the converted checkpoint (`diffusion.checkpoint`'s layout) atomically."""
    data = config["data"]
    checkpoint = checkpoint_dict(
        model.state_dict(), config, image_size=data["image_size"], in_channels=data["channels"],
        num_classes=data["num_classes"], converted_from="improved-diffusion",
    )
    save_checkpoint(checkpoint, path)


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
    write_converted(model, build_config(**args), output_path)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {output_path}: UNet with {num_params:,} parameters", file=sys.stderr)


if __name__ == "__main__":
    main()
