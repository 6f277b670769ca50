"""Tests of the improved-diffusion converter: key layout, attention head order, flag
mapping and the checkpoint written by ``python -m diffusion.convert``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import diffusion  # noqa: F401  (installs the torchvision shim before anything else)
from diffusion.convert import build_config, from_improved_diffusion, main
from diffusion.nets.blocks import AttentionBlock
from diffusion.nets.convert import unet_kwargs_from_flags
from diffusion.nets.unet import UNet


# ----------------------------------------------------------------------------- their layout
def iddpm_state_shapes(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult,
    attention_resolutions="16,8",
    learn_sigma=False,
    class_cond=False,
    use_scale_shift_norm=True,
):
    """Key -> shape of improved-diffusion's ``UNetModel(...).state_dict()``.

    Derived from the construction rules of improved_diffusion/unet.py: ``attention_ds`` are
    downsampling rates (image_size // resolution), the input blocks record their widths for
    the skip connections, the output blocks pop them, ``ResBlock`` = in_layers (GN, SiLU,
    conv) / emb_layers (SiLU, Linear) / out_layers (GN, SiLU, Dropout, conv) / 1x1
    skip_connection when the width changes, ``AttentionBlock`` = norm / qkv / proj_out.
    """
    C, E = num_channels, 4 * num_channels
    attention_ds = {image_size // int(r) for r in attention_resolutions.split(",")}
    shapes = {}

    def add(prefix, **entries):
        for name, shape in entries.items():
            shapes[f"{prefix}{name.replace('__', '.')}"] = shape

    def res(prefix, cin, cout):
        emb_out = 2 * cout if use_scale_shift_norm else cout
        add(
            prefix,
            in_layers__0__weight=(cin,),
            in_layers__0__bias=(cin,),
            in_layers__2__weight=(cout, cin, 3, 3),
            in_layers__2__bias=(cout,),
            emb_layers__1__weight=(emb_out, E),
            emb_layers__1__bias=(emb_out,),
            out_layers__0__weight=(cout,),
            out_layers__0__bias=(cout,),
            out_layers__3__weight=(cout, cout, 3, 3),
            out_layers__3__bias=(cout,),
        )
        if cin != cout:
            add(prefix, skip_connection__weight=(cout, cin, 1, 1), skip_connection__bias=(cout,))

    def attn(prefix, ch):
        add(
            prefix,
            norm__weight=(ch,),
            norm__bias=(ch,),
            qkv__weight=(3 * ch, ch, 1),
            qkv__bias=(3 * ch,),
            proj_out__weight=(ch, ch, 1),
            proj_out__bias=(ch,),
        )

    add(
        "time_embed.",
        **{"0__weight": (E, C), "0__bias": (E,), "2__weight": (E, E), "2__bias": (E,)},
    )
    if class_cond:
        shapes["label_emb.weight"] = (1000, E)
    add("input_blocks.0.0.", weight=(C, 3, 3, 3), bias=(C,))
    chans, ch, ds, idx = [C], C, 1, 1
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            res(f"input_blocks.{idx}.0.", ch, mult * C)
            ch = mult * C
            if ds in attention_ds:
                attn(f"input_blocks.{idx}.1.", ch)
            chans.append(ch)
            idx += 1
        if level != len(channel_mult) - 1:
            add(f"input_blocks.{idx}.0.op.", weight=(ch, ch, 3, 3), bias=(ch,))
            chans.append(ch)
            idx, ds = idx + 1, ds * 2
    res("middle_block.0.", ch, ch)
    attn("middle_block.1.", ch)
    res("middle_block.2.", ch, ch)
    idx = 0
    for level, mult in reversed(list(enumerate(channel_mult))):
        for i in range(num_res_blocks + 1):
            res(f"output_blocks.{idx}.0.", ch + chans.pop(), mult * C)
            ch, sub = mult * C, 1
            if ds in attention_ds:
                attn(f"output_blocks.{idx}.1.", ch)
                sub = 2
            if level and i == num_res_blocks:
                add(f"output_blocks.{idx}.{sub}.conv.", weight=(ch, ch, 3, 3), bias=(ch,))
                ds //= 2
            idx += 1
    add("out.", **{"0__weight": (ch,), "0__bias": (ch,)})
    add(
        "out.",
        **{"2__weight": (6 if learn_sigma else 3, C, 3, 3), "2__bias": (6 if learn_sigma else 3,)},
    )
    return shapes


def random_state_dict(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * 0.1 for k, s in shapes.items()}


TINY_FLAGS = dict(
    image_size=16,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2,2",
    attention_resolutions="8,4",
    learn_sigma=True,
    class_cond=True,
    num_heads=2,
)


def tiny_iddpm_state_dict(seed=0):
    shapes = iddpm_state_shapes(16, 32, 1, (1, 2, 2), "8,4", learn_sigma=True, class_cond=True)
    return random_state_dict(shapes, seed)


# ----------------------------------------------------------------------------- key layout
CIFAR_FLAGS = dict(
    image_size=32,
    num_channels=128,
    num_res_blocks=3,
    learn_sigma=True,
    dropout=0.3,
    attention_resolutions="16,8",
)

# Literal entries of improved-diffusion's CIFAR-10 model (channel_mult (1, 2, 2, 2)).
CIFAR_LITERAL_SHAPES = {
    "input_blocks.0.0.weight": (128, 3, 3, 3),
    "time_embed.0.weight": (512, 128),
    "time_embed.2.weight": (512, 512),
    "input_blocks.1.0.emb_layers.1.weight": (256, 512),  # 2 x 128: scale and shift
    "input_blocks.4.0.op.weight": (128, 128, 3, 3),
    "input_blocks.5.0.skip_connection.weight": (256, 128, 1, 1),
    "input_blocks.5.1.qkv.weight": (768, 256, 1),  # attention at 16x16
    "input_blocks.15.0.in_layers.2.weight": (256, 256, 3, 3),
    "middle_block.1.qkv.weight": (768, 256, 1),
    "middle_block.1.proj_out.weight": (256, 256, 1),
    "output_blocks.0.0.in_layers.0.weight": (512,),
    "output_blocks.3.1.conv.weight": (256, 256, 3, 3),
    "output_blocks.7.2.conv.weight": (256, 256, 3, 3),  # attention at 8x8, then upsample
    "output_blocks.12.0.in_layers.0.weight": (384,),
    "output_blocks.15.0.skip_connection.weight": (128, 256, 1, 1),
    "out.0.weight": (128,),
    "out.2.weight": (6, 128, 3, 3),
}
CIFAR_ABSENT = [
    "input_blocks.1.1.qkv.weight",
    "input_blocks.16.0.op.weight",
    "output_blocks.16.0.in_layers.0.weight",
    "label_emb.weight",
]


def test_cifar_layout_matches_improved_diffusion():
    theirs = iddpm_state_shapes(32, 128, 3, (1, 2, 2, 2), "16,8", learn_sigma=True)
    for key, shape in CIFAR_LITERAL_SHAPES.items():
        assert theirs[key] == shape, key
    with torch.device("meta"):  # shapes only: no memory, no time
        ours = UNet(**unet_kwargs_from_flags(**CIFAR_FLAGS))
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == theirs
    for key in CIFAR_ABSENT:
        assert key not in ours_shapes
    assert sum(math.prod(s) for s in ours_shapes.values()) == 52_546_438


def test_all_weights_land():
    sd = tiny_iddpm_state_dict()
    model = from_improved_diffusion(sd, **TINY_FLAGS)
    loaded = model.state_dict()
    assert set(loaded) == set(sd)
    for key, value in sd.items():
        assert torch.equal(loaded[key], value), key
    assert model.label_emb.weight.shape == (1000, 128) and model.out_channels == 6


def test_ddp_prefix_is_stripped():
    sd = tiny_iddpm_state_dict()
    model = from_improved_diffusion({f"module.{k}": v for k, v in sd.items()}, **TINY_FLAGS)
    torch.testing.assert_close(model.out[2].weight, sd["out.2.weight"], rtol=0, atol=0)


def test_wrong_flags_report_keys():
    sd = tiny_iddpm_state_dict()
    with pytest.raises(ValueError, match=r"missing keys(.|\n)*unexpected keys"):
        from_improved_diffusion(sd, **{**TINY_FLAGS, "attention_resolutions": "4"})
    with pytest.raises(ValueError, match=r"shape mismatches(.|\n)*out\.2\.weight"):
        from_improved_diffusion(sd, **{**TINY_FLAGS, "learn_sigma": False})


def test_unknown_flag_lists_valid_flags():
    with pytest.raises(ValueError, match=r"\['num_chanels'\].*'num_channels'"):
        from_improved_diffusion({}, num_chanels=64)


# ----------------------------------------------------------------------------- head order
def iddpm_attention(sd, x, num_heads):
    """improved-diffusion's AttentionBlock._forward + QKVAttention, restated in float64."""
    b, c, *spatial = x.shape
    x = x.reshape(b, c, -1)
    normed = F.group_norm(x, 32, sd["norm.weight"], sd["norm.bias"], 1e-5)
    qkv = F.conv1d(normed, sd["qkv.weight"], sd["qkv.bias"])
    qkv = qkv.reshape(b * num_heads, -1, qkv.shape[2])  # (B, 3C, T) -> (B*H, 3C/H, T)
    ch = qkv.shape[1] // 3
    q, k, v = torch.split(qkv, ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    h = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, x.shape[-1])  # (B, C, T)
    h = F.conv1d(h, sd["proj_out.weight"], sd["proj_out.bias"])
    return (x + h).reshape(b, c, *spatial)


def guided_new_order_attention(sd, x, num_heads):
    """guided-diffusion's QKVAttention (use_new_attention_order=True), restated."""
    b, c, *spatial = x.shape
    x = x.reshape(b, c, -1)
    qkv = F.conv1d(
        F.group_norm(x, 32, sd["norm.weight"], sd["norm.bias"], 1e-5),
        sd["qkv.weight"],
        sd["qkv.bias"],
    )
    t, ch = qkv.shape[-1], c // num_heads
    q, k, v = (z.reshape(b * num_heads, ch, t) for z in qkv.chunk(3, dim=1))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
    h = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, t)
    h = F.conv1d(h, sd["proj_out.weight"], sd["proj_out.bias"])
    return (x + h).reshape(b, c, *spatial)


def attention_state(channels, seed):
    gen = torch.Generator().manual_seed(seed)
    return {
        "norm.weight": 1 + 0.1 * torch.randn(channels, generator=gen, dtype=torch.float64),
        "norm.bias": 0.1 * torch.randn(channels, generator=gen, dtype=torch.float64),
        "qkv.weight": 0.3
        * torch.randn(3 * channels, channels, 1, generator=gen, dtype=torch.float64),
        "qkv.bias": 0.1 * torch.randn(3 * channels, generator=gen, dtype=torch.float64),
        "proj_out.weight": 0.3
        * torch.randn(channels, channels, 1, generator=gen, dtype=torch.float64),
        "proj_out.bias": 0.1 * torch.randn(channels, generator=gen, dtype=torch.float64),
    }


@pytest.mark.parametrize("num_heads", [1, 2, 4])
def test_attention_head_order_matches_improved_diffusion(num_heads):
    sd = attention_state(64, seed=num_heads)
    block = AttentionBlock(64, num_heads=num_heads).double()
    block.load_state_dict(sd, strict=True)
    x = torch.randn(2, 64, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    expected = iddpm_attention(sd, x, num_heads)
    torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)
    if num_heads > 1:  # the other split order is a different function: the test can fail
        assert not torch.allclose(guided_new_order_attention(sd, x, num_heads), expected, atol=1e-4)


def test_new_attention_order_is_permuted_on_load():
    flags = dict(
        image_size=8,
        num_channels=64,
        num_res_blocks=1,
        channel_mult="1,1",
        attention_resolutions="4",
        num_heads=4,
        use_new_attention_order=True,
    )
    shapes = iddpm_state_shapes(8, 64, 1, (1, 1), "4")
    sd = {k: v.double() for k, v in random_state_dict(shapes, seed=5).items()}
    model = from_improved_diffusion(sd, **flags).double()
    x = torch.randn(2, 64, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    prefix = "middle_block.1."
    theirs = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    torch.testing.assert_close(
        model.middle_block[1](x), guided_new_order_attention(theirs, x, 4), rtol=1e-10, atol=1e-10
    )


# ----------------------------------------------------------------------------- diffusion flags
@pytest.mark.parametrize(
    "flags, mean, var, loss",
    [
        (dict(), "epsilon", "fixed_large", "rescaled_mse"),  # their defaults
        (dict(rescale_learned_sigmas=False), "epsilon", "fixed_large", "mse"),
        (dict(sigma_small=True, rescale_learned_sigmas=False), "epsilon", "fixed_small", "mse"),
        (dict(learn_sigma=True, sigma_small=True), "epsilon", "learned_range", "rescaled_mse"),
        (dict(use_kl=True, learn_sigma=True), "epsilon", "learned_range", "rescaled_kl"),
        (dict(predict_xstart=True), "start_x", "fixed_large", "rescaled_mse"),
    ],
)
def test_diffusion_flags_map_as_create_gaussian_diffusion(flags, mean, var, loss):
    cfg = build_config(**flags)["diffusion"]
    assert (cfg["model_mean_type"], cfg["model_var_type"], cfg["loss_type"]) == (mean, var, loss)


# ----------------------------------------------------------------------------- command line
CLI_ARGS = [
    "--image_size",
    "16",
    "--num_channels",
    "32",
    "--num_res_blocks",
    "1",
    "--channel_mult",
    "1,2,2",
    "--attention_resolutions",
    "8,4",
    "--learn_sigma",
    "True",
    "--class_cond",
    "True",
    "--num_heads",
    "2",
    "--diffusion_steps",
    "4000",
    "--noise_schedule",
    "cosine",
    "--use_kl",
    "False",
    "--predict_xstart",
    "False",
    "--rescale_timesteps",
    "True",
    "--rescale_learned_sigmas",
    "True",
    "--dropout",
    "0.3",
]


def test_cli_round_trip(tmp_path):
    sd = tiny_iddpm_state_dict()
    torch.save(sd, tmp_path / "in.pt")
    main([str(tmp_path / "in.pt"), str(tmp_path / "out.ckpt"), *CLI_ARGS])
    assert sorted(os.listdir(tmp_path)) == ["in.pt", "out.ckpt"]  # no temporary file left
    ckpt = torch.load(tmp_path / "out.ckpt", map_location="cpu", weights_only=True)
    assert set(ckpt) == {"state_dict", "hyper_parameters", "converted_from"}
    assert ckpt["converted_from"] == "improved-diffusion"
    assert ckpt["state_dict"].keys() == {f"model.{k}" for k in sd}
    for key, value in sd.items():
        assert torch.equal(ckpt["state_dict"][f"model.{key}"], value), key
    hparams = ckpt["hyper_parameters"]  # the layout train.py writes (diffusion.checkpoint)
    assert {k: hparams[k] for k in ("image_size", "in_channels", "num_classes", "label_dropout")} == {
        "image_size": 16, "in_channels": 3, "num_classes": 1000, "label_dropout": 0.0}
    config = hparams["run_config"]
    json.dumps(config)  # plain values only
    assert config["data"] == {"image_size": 16, "channels": 3, "num_classes": 1000}
    assert config["diffusion"] == {
        "_target_": "diffusion.process.gaussian_diffusion.GaussianDiffusion",
        "betas": {
            "_target_": "diffusion.process.schedules.get_named_beta_schedule",
            "schedule_name": "cosine",
            "num_diffusion_timesteps": 4000,
        },
        "model_mean_type": "epsilon",
        "model_var_type": "learned_range",
        "loss_type": "rescaled_mse",
        "rescale_timesteps": True,
    }
    model_cfg = dict(config["model"])
    assert model_cfg.pop("_target_") == "diffusion.nets.unet.UNet"
    assert model_cfg["out_channels"] == 6 and model_cfg["channel_mult"] == [1, 2, 2]
    assert model_cfg["dropout"] == 0.3 and model_cfg["attention_resolutions"] == [8, 4]
    rebuilt = UNet(**model_cfg)
    rebuilt.load_state_dict({k[len("model.") :]: v for k, v in ckpt["state_dict"].items()})


def test_hydra_instantiates_the_config():
    hydra_utils = pytest.importorskip("hydra.utils")
    config = build_config(**{**TINY_FLAGS, "diffusion_steps": 4000, "noise_schedule": "cosine"})
    model = hydra_utils.instantiate(config["model"])
    assert isinstance(model, UNet) and model.channel_mult == (1, 2, 2)
    pytest.importorskip("diffusion.process.gaussian_diffusion")
    process = hydra_utils.instantiate(config["diffusion"])
    assert process.num_timesteps == 4000 and process.model_var_type.value == "learned_range"
    assert process.loss_type.value == "rescaled_mse" and process.rescale_timesteps


def test_failed_write_leaves_nothing(tmp_path, monkeypatch, capsys):
    torch.save(tiny_iddpm_state_dict(), tmp_path / "in.pt")

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(SystemExit) as exit_info:  # the command's one-line error, status 2
        main([str(tmp_path / "in.pt"), str(tmp_path / "out.ckpt"), *CLI_ARGS])
    assert exit_info.value.code == 2 and "disk full" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["in.pt"]


def test_python_dash_m_entry_point(tmp_path):
    torch.save(tiny_iddpm_state_dict(), tmp_path / "in.pt")
    out = tmp_path / "out.ckpt"
    result = subprocess.run(
        [sys.executable, "-m", "diffusion.convert", str(tmp_path / "in.pt"), str(out), *CLI_ARGS],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert out.exists()


def test_cli_rejects_bad_boolean(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["a.pt", "b.ckpt", "--learn_sigma", "maybe"])
    assert exit_info.value.code == 2
    assert "boolean value expected" in capsys.readouterr().err
