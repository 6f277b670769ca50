"""``python -m diffusion.convert IN.pt OUT.ckpt --flags``: an improved-diffusion checkpoint
as a checkpoint of this project, which sample.py and evaluate.py read like any other.

Flags are improved-diffusion's model and diffusion flags, with the same names and defaults::

    python -m diffusion.convert IN.pt OUT.ckpt --image_size 32 --num_channels 128 \\
        --num_res_blocks 3 --learn_sigma True --dropout 0.3 --diffusion_steps 4000 \\
        --noise_schedule cosine --use_kl False --predict_xstart False \\
        --rescale_timesteps True --rescale_learned_sigmas True

Bad input (a missing or unreadable input, a file that is not a state dict, flags that do not
fit the weights, a missing or unwritable output folder) ends the command with one line,
``error: <what is wrong> <how to fix it>``, and exit status 2, and leaves no output file;
argparse reports a malformed flag the same way, after its usage line.

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
import pickle
import sys
import warnings
import zipfile

import torch

from diffusion.checkpoint import CheckpointError, build_diffusion, checkpoint_dict, save_checkpoint
from diffusion.nets.convert import (
    FLAG_DEFAULTS,
    from_improved_diffusion,
    resolve_flags,
    unet_kwargs_from_flags,
)
from diffusion.nets.unet import UNet
from diffusion.utils.checks import UnwritableError, require_writable_dir
from diffusion.utils.errors import UserError

__all__ = ["build_config", "convert", "diffusion_config_from_flags", "from_improved_diffusion", "main",
           "unet_kwargs_from_flags", "write_converted"]
# Flags that are comma-separated ints ("16,8"); argparse checks their form.
COMMA_INT_FLAGS = ("attention_resolutions", "channel_mult")


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


def comma_ints(value: str) -> str:
    """A flag of comma-separated positive ints ("16,8"; "" for the default), kept as given."""
    parts = [part.strip() for part in value.split(",") if part.strip()]
    if not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"comma-separated positive integers expected (e.g. 16,8), got {value!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffusion.convert",
        description="Convert an improved-diffusion UNet checkpoint into this project's format.",
    )
    parser.add_argument("input", help="improved-diffusion model*.pt or ema_*.pt state dict")
    parser.add_argument("output", help="checkpoint to write (e.g. converted.ckpt)")
    for name, default in FLAG_DEFAULTS.items():
        kind = str2bool if isinstance(default, bool) else comma_ints if name in COMMA_INT_FLAGS else type(default)
        metavar = "BOOL" if kind is str2bool else "INTS" if kind is comma_ints else kind.__name__.upper()
        parser.add_argument(f"--{name}", default=default, type=kind, metavar=metavar)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``python -m diffusion.convert IN.pt OUT.ckpt --flags``.
    Bad input prints ``error: <message>`` and exits with status 2, as the other entry points
    do (`diffusion.jobs.errors`, a room above this one)."""
    try:
        convert(argv)
    except (UserError, CheckpointError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)


def convert(argv: list[str] | None = None) -> None:
    """The command's work; bad input raises a UserError (or CheckpointError) before the
    output is written, and a failed write leaves no file."""
    args = vars(build_parser().parse_args(argv))
    input_path, output_path = args.pop("input"), args.pop("output")
    check_output_path(output_path)
    try:
        config = build_config(**args)
    except ValueError as err:  # e.g. no default channel_mult for the image size
        raise UserError(f"the flags do not describe a UNet: {err}") from None
    try:
        build_diffusion(config, output_path)  # a schedule name or step count that cannot be built
    except CheckpointError as err:
        raise UserError(f"--noise_schedule {args['noise_schedule']} --diffusion_steps "
                        f"{args['diffusion_steps']}: {err.__cause__ or err}") from None
    state_dict = read_state_dict(input_path)
    try:
        model = from_improved_diffusion(state_dict, **args)
    except ValueError as err:
        raise UserError(f"{input_path}: {summary(str(err))}") from None
    try:
        write_converted(model, config, output_path)
    except OSError as err:
        raise UnwritableError(f"{err}; check the space and permissions of the output folder") from None
    num_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {output_path}: UNet with {num_params:,} parameters", file=sys.stderr)


def check_output_path(path: str) -> None:
    """The output names a file in an existing, writable folder (a missing folder is refused
    rather than created: it is more often a typo than a wish)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"output {path} is a folder; name the checkpoint file to write, e.g. {os.path.join(path, 'converted.ckpt')}")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"the output folder {folder} is a file, not a folder; fix the output path {path}")
    if not os.path.isdir(folder):
        raise UserError(f"the output folder {folder} does not exist; create it first, or fix the output path {path}")
    require_writable_dir("output", folder)  # named as in the usage line


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The improved-diffusion state dict (key -> tensor) in ``path``, or a UserError saying
    what the file is instead."""
    if not os.path.isfile(path):
        raise UserError(f"input {path} not found; pass an improved-diffusion model*.pt or ema_*.pt file")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own message is about weights_only, not the file
        raise UserError(f"cannot read input {path} as a state dict: it is damaged, or holds Python objects "
                        "beside the tensors; pass an improved-diffusion model*.pt or ema_*.pt file") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read input {path} as a state dict ({reason}); is it damaged or truncated?") from None
    if isinstance(state_dict, dict) and "hyper_parameters" in state_dict and "state_dict" in state_dict:
        raise UserError(f"input {path} is already a checkpoint of this project: pass it to sample.py as it is")
    if not isinstance(state_dict, dict) or not state_dict:
        raise UserError(f"input {path} holds {'an empty dict' if state_dict == {} else 'a ' + type(state_dict).__name__}, "
                        "not a state dict (parameter name -> tensor); pass an improved-diffusion model*.pt or ema_*.pt")
    others = sorted(str(key) for key, value in state_dict.items() if not isinstance(value, torch.Tensor))
    if others:
        raise UserError(f"input {path} is not a bare state dict: {others[:3]} are not tensors; pass the "
                        "model's own file (model*.pt or ema_*.pt), not a training-state file")
    return state_dict


def summary(message: str) -> str:
    """A long multi-line message (`from_improved_diffusion`'s key listing) cut to its first
    line and the first entry under each heading, for a one-line error."""
    lines = [line for line in message.splitlines() if line.strip()]
    kept = lines[:1]
    for previous, line in zip(lines, lines[1:], strict=False):
        if previous.startswith("  ") and not previous.startswith("    "):
            kept.append(f"{previous.strip()} e.g. {line.strip()}")
    return "; ".join(kept)


if __name__ == "__main__":
    main()
