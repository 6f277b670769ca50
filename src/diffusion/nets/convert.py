"""Improved-diffusion (and guided-diffusion) UNet weights in this project's UNet.

``from_improved_diffusion(state_dict, **flags)`` builds a `diffusion.nets.unet.UNet` from
improved-diffusion's flag names and loads the weights strictly. Our module layout mirrors
theirs (``input_blocks`` / ``middle_block`` / ``output_blocks`` / ``out``, ``time_embed``,
``label_emb``), so the key map is the identity except for:

- a ``module.`` prefix (a state dict saved from a DistributedDataParallel wrapper) is dropped;
- guided-diffusion's ``use_new_attention_order=True`` lays the ``qkv`` rows out as
  (q|k|v, head, channel); they are permuted to the head-major (head, q|k|v, channel)
  layout of improved-diffusion's ``QKVAttention``, which our ``AttentionBlock`` reads.

Given the same weights the converted model computes the same function. The command that
writes a checkpoint from such weights is `diffusion.convert`.
"""

from __future__ import annotations

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
