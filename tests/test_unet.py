"""Tests of the IDDPM/ADM UNet (diffusion.nets): shapes, conditioning, checkpointing,
initialisation, validation and the attention / embedding math against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import diffusion  # noqa: F401  (installs the torchvision shim before anything else)
from diffusion.nets.blocks import AttentionBlock, GroupNorm32, ResBlock
from diffusion.nets.embeddings import timestep_embedding
from diffusion.nets.unet import UNet


def tiny(**overrides) -> UNet:
    """An 8x8 UNet small enough for CPU tests."""
    kwargs = dict(
        image_size=8,
        in_channels=3,
        model_channels=32,
        out_channels=3,
        num_res_blocks=1,
        attention_resolutions=(4,),
    )
    kwargs.update(overrides)
    return UNet(**kwargs)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter (including the zero-initialised ones) with random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    return model


def inputs(batch=2, channels=3, size=8, seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen, dtype=dtype)
    t = torch.arange(batch) * 37 + 3
    return x, t


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize(
    "image_size, channel_mult, attention",
    [
        (8, None, (8, 4)),
        (16, None, (8,)),
        (32, (1, 2, 2, 2), (16, 8)),
        (64, (1, 2, 2, 2), (8,)),
    ],
)
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_output_shape(image_size, channel_mult, attention, learn_sigma):
    out_channels = 6 if learn_sigma else 3
    model = tiny(
        image_size=image_size,
        channel_mult=channel_mult,
        attention_resolutions=attention,
        out_channels=out_channels,
    )
    levels = len(model.channel_mult)
    seen = {}
    model.middle_block.register_forward_hook(lambda m, a, out: seen.update(mid=out.shape))
    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        out = model(x, torch.tensor([0, 999]))
    assert out.shape == (2, out_channels, image_size, image_size)
    assert out.dtype == x.dtype
    lowest = image_size // 2 ** (levels - 1)
    assert seen["mid"][2:] == (lowest, lowest)


def test_default_channel_mult_by_image_size():
    assert tiny(image_size=32, attention_resolutions=(16, 8)).channel_mult == (1, 2, 2, 2)
    assert tiny(image_size=8, attention_resolutions=(8,)).channel_mult == (1, 2)
    assert tiny(image_size=16, attention_resolutions=(8,)).channel_mult == (1, 2, 2)
    with pytest.raises(ValueError, match="image_size=24"):
        tiny(image_size=24, attention_resolutions=())


def test_attention_blocks_only_at_requested_resolutions():
    model = tiny(image_size=16, channel_mult=(1, 1, 1), attention_resolutions=(8,))
    seen = []
    for module in model.modules():
        if isinstance(module, AttentionBlock):
            module.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-1]))
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16), torch.tensor([1]))
    # one down, middle (always, at 4x4), two up (num_res_blocks + 1) at 8x8
    assert sorted(seen) == [4, 8, 8, 8]


def test_resblock_updown_and_avgpool_resampling():
    for kwargs in (dict(resblock_updown=True), dict(conv_resample=False)):
        model = tiny(image_size=16, attention_resolutions=(4,), **kwargs)
        with torch.no_grad():
            out = model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
        assert out.shape == (2, 3, 16, 16)
    keys = tiny(resblock_updown=True).state_dict()
    assert not any(k.endswith(("op.weight", "conv.weight")) for k in keys)


def test_config_rebuilds_the_same_model():
    model = tiny(num_classes=5, dropout=0.1)
    config = model.config()
    assert config["channel_mult"] == [1, 2] and isinstance(config["attention_resolutions"], list)
    rebuilt = UNet(**config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


# ----------------------------------------------------------------------------- initialisation
def test_fresh_unet_outputs_exactly_zero():
    model = tiny(num_classes=4)
    x, t = inputs(dtype=torch.float32)
    out = model(x, t, y=torch.tensor([0, 3]))
    assert torch.equal(out, torch.zeros_like(out))
    zeroed = [n for n, p in model.named_parameters() if not p.any()]
    assert "out.2.weight" in zeroed and "middle_block.1.proj_out.weight" in zeroed
    assert "input_blocks.1.0.out_layers.3.weight" in zeroed
    assert model.input_blocks[0][0].weight.any()  # only the output convs are zeroed


# ----------------------------------------------------------------------------- conditioning
def test_class_conditioning_changes_output():
    model = randomize_(tiny(num_classes=10).double())
    assert model.label_emb.weight.shape == (10, 4 * 32)
    x, t = inputs()
    out_a = model(x, t, y=torch.tensor([0, 1]))
    out_b = model(x, t, y=torch.tensor([2, 1]))
    assert not torch.allclose(out_a[0], out_b[0])
    torch.testing.assert_close(out_a[1], out_b[1], rtol=0, atol=0)


def test_label_errors():
    x, t = inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="class-conditional"):
        tiny(num_classes=10)(x, t)
    with pytest.raises(ValueError, match="unconditional"):
        tiny()(x, t, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        tiny(num_classes=10)(x, t, y=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        tiny(num_classes=10)(x, t, y=torch.tensor([0.0, 1.0]))


def test_input_errors():
    model = tiny()
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.zeros(2, 1, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.zeros(2, 3, 7, 7), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="timesteps"):
        model(torch.zeros(2, 3, 8, 8), torch.tensor([0, 1, 2]))


# ----------------------------------------------------------------------------- timesteps
def test_float_timesteps_accepted():
    model = randomize_(tiny().double())
    x, t = inputs()
    out_int = model(x, t)
    torch.testing.assert_close(model(x, t.double()), out_int, rtol=0, atol=0)
    assert not torch.allclose(model(x, t.double() + 0.5), out_int)
    # a scalar step is broadcast to the batch
    torch.testing.assert_close(model(x, 7.25), model(x, torch.full((2,), 7.25)), rtol=0, atol=0)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 1.0, 10.5, 999.0], dtype=torch.float64)
    dim = 6
    emb = timestep_embedding(t, dim, dtype=torch.float64)
    expected = torch.empty(4, dim, dtype=torch.float64)
    for i in range(3):
        omega = 10000.0 ** (-i / 3)
        expected[:, i] = torch.cos(t * omega)  # cosines first (improved-diffusion's layout)
        expected[:, 3 + i] = torch.sin(t * omega)
    torch.testing.assert_close(emb, expected, rtol=1e-12, atol=1e-12)
    odd = timestep_embedding(t, 7, dtype=torch.float64)
    assert odd.shape == (4, 7) and torch.equal(odd[:, -1], torch.zeros(4, dtype=torch.float64))
    assert timestep_embedding(t.long(), 8).dtype == torch.float32


# ----------------------------------------------------------------------------- checkpointing
def test_gradient_checkpointing_same_output_and_gradients(monkeypatch):
    plain = randomize_(tiny(dropout=0.2, num_classes=3).double())
    ckpt = tiny(dropout=0.2, num_classes=3, use_checkpoint=True).double()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    x, t = inputs()
    y = torch.tensor([0, 2])
    results = []
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(123)  # same dropout masks in both models
        xg = x.clone().requires_grad_(True)
        out = model(xg, t, y=y)
        (out**2).sum().backward()
        results.append((out.detach(), xg.grad, {n: p.grad for n, p in model.named_parameters()}))
    blocks = sum(isinstance(m, ResBlock | AttentionBlock) for m in ckpt.modules())
    assert len(calls) == blocks  # every residual and attention block was checkpointed
    (out_a, gx_a, g_a), (out_b, gx_b, g_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_b, gx_a, rtol=1e-10, atol=1e-12)
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], rtol=1e-10, atol=1e-12, msg=name)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(model_channels=48), "= 48 channels"),
        (dict(model_channels=48, channel_mult=(2, 3)), r"48 \* 3 = 144 channels"),
        (dict(image_size=12, channel_mult=(1, 2, 2)), r"image_size=12.*\(1, 2, 2\)"),
        (dict(attention_resolutions=(16, 4)), r"\[16\].*\[8, 4\]"),
        (dict(num_heads=3), "num_heads=3"),
        (dict(num_head_channels=24), "num_head_channels=24"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_invalid_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


# ----------------------------------------------------------------------------- block math
def reference_attention(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v per head, heads read head-major from the qkv projection."""
    b, c, hh, ww = x.shape
    heads = block.num_heads
    d = c // heads
    flat = x.reshape(b, c, hh * ww)
    normed = F.group_norm(flat, 32, block.norm.weight, block.norm.bias, block.norm.eps)
    w = block.qkv.weight[:, :, 0]
    qkv = torch.einsum("oc,bct->bot", w, normed) + block.qkv.bias[None, :, None]
    outs = []
    for h in range(heads):
        base = 3 * d * h
        q = qkv[:, base : base + d].transpose(1, 2)  # (B, T, d)
        k = qkv[:, base + d : base + 2 * d].transpose(1, 2)
        v = qkv[:, base + 2 * d : base + 3 * d].transpose(1, 2)
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)  # (B, T, T)
        outs.append((weights @ v).transpose(1, 2))  # (B, d, T)
    a = torch.cat(outs, dim=1)  # (B, C, T), head-major
    proj = torch.einsum("oc,bct->bot", block.proj_out.weight[:, :, 0], a)
    return (flat + proj + block.proj_out.bias[None, :, None]).reshape(b, c, hh, ww)


@pytest.mark.parametrize(
    "kwargs", [dict(num_heads=4), dict(num_head_channels=16), dict(num_heads=1)]
)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_attention_matches_reference(kwargs, memory_format):
    # forward and gradients, in both layouts: the block works token-major, on views of a
    # channels-last input and on a transposed copy of an NCHW one
    block = randomize_(AttentionBlock(64, **kwargs).double(), seed=3)
    x = torch.randn(2, 64, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x = x.contiguous(memory_format=memory_format).requires_grad_(True)
    out, expected = block(x), reference_attention(block, x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(out)
    inputs = [x, block.norm.weight, block.qkv.weight, block.qkv.bias, block.proj_out.weight]
    grads = torch.autograd.grad(out, inputs, upstream)
    expected_grads = torch.autograd.grad(expected, inputs, upstream)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)


def test_resblock_scale_shift_matches_closed_form():
    block = randomize_(ResBlock(32, 16, 0.0, out_channels=64, use_scale_shift_norm=True).double())
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 32, 4, 4, dtype=torch.float64, generator=gen)
    emb = torch.randn(2, 16, dtype=torch.float64, generator=gen)
    n1, c1 = block.in_layers[0], block.in_layers[2]
    n2, c2 = block.out_layers[0], block.out_layers[3]
    lin = block.emb_layers[1]
    h = F.conv2d(
        F.silu(F.group_norm(x, 32, n1.weight, n1.bias, n1.eps)), c1.weight, c1.bias, padding=1
    )
    scale, shift = (F.silu(emb) @ lin.weight.T + lin.bias).chunk(2, dim=1)
    h = (
        F.group_norm(h, 32, n2.weight, n2.bias, n2.eps) * (1 + scale[..., None, None])
        + shift[..., None, None]
    )
    h = F.conv2d(F.silu(h), c2.weight, c2.bias, padding=1)
    skip = F.conv2d(x, block.skip_connection.weight, block.skip_connection.bias)
    torch.testing.assert_close(block(x, emb), skip + h, rtol=1e-10, atol=1e-10)


def test_groupnorm32_precision():
    norm = randomize_(GroupNorm32(32, 64))
    x = torch.randn(2, 64, 4, 4) * 3 + 1
    out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16
    expected = F.group_norm(x.bfloat16().float(), 32, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(out.float(), expected.bfloat16().float(), rtol=0, atol=0)
    x64 = x.double()
    out64 = norm.double()(x64)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(
        out64, F.group_norm(x64, 32, norm.weight, norm.bias, norm.eps), rtol=1e-13, atol=1e-13
    )


def test_autocast_bf16_forward():
    model = randomize_(tiny())
    x, t = inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, model(x, t), rtol=0.1, atol=0.1)


def test_cpu_dropout_keeps_each_value_with_probability_1_minus_p_and_scales_it():
    from diffusion.nets.blocks import Dropout

    torch.manual_seed(0)
    p, n = 0.3, 200_000
    layer = Dropout(p)
    x = torch.full((n,), 2.0, requires_grad=True)
    y = layer(x)
    kept = y != 0
    assert torch.equal(y[kept], torch.full_like(y[kept], 2.0 / (1 - p)))  # scaled by 1/(1 - p)
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sigma
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / (1 - p), rtol=0, atol=1e-6)
    assert torch.equal(layer.eval()(x), x)  # identity in eval
    layer.train()
    fresh = torch.ones(8, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    assert layer(fresh).is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(Dropout(1.0)(fresh), torch.zeros_like(fresh))  # p = 1: nn.Dropout's path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_equals_the_bool_mask_product_bit_for_bit(dtype):
    """The 0/1 mask of x's dtype (a fast plain product) gives exactly what x * bool mask gave,
    forward and backward, from the same random draws."""
    from diffusion.nets.blocks import Dropout

    p = 0.3
    x = torch.randn(4, 8, 5, 5, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    reference = x.detach().clone().requires_grad_()
    torch.manual_seed(1)
    y = Dropout(p)(x)
    torch.manual_seed(1)
    keep = torch.rand_like(reference, dtype=torch.float32) >= p
    expected = (reference * keep).mul_(1.0 / (1.0 - p))
    assert y.dtype == dtype and torch.equal(y, expected) and 0 < keep.sum() < keep.numel()
    grad = torch.randn_like(y)
    y.backward(grad)
    expected.backward(grad)
    assert torch.equal(x.grad, reference.grad)
