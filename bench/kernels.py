"""Same-process before/after timings of the optimisations that no config switch turns off.

The harness (bench/performance.py) ablates what a config can switch (channels_last, bf16,
compile, fused AdamW, gradient checkpointing). These changes live in the code instead, so
each is timed here against the implementation it replaced, at the CIFAR UNet's sizes:

- dropout: ``F.dropout`` (bernoulli_ mask) against `diffusion.nets.blocks.Dropout`
  (torch.rand mask on a CPU), forward and backward; and the mask as a bool tensor (what the
  layer did before) against the layer's 0/1 mask of the input's dtype;
- attention: ``scaled_dot_product_attention`` on q, k, v sliced from a channel-major qkv tensor
  with d strided (the unfused math path) against `diffusion.nets.blocks.qkv_attention` (views
  of the token-major qkv with d innermost: the fused flash kernel), forward and backward; and
  the whole attention block as it was (channel-major: Conv1d projections, q, k, v and the heads'
  output copied into place) against `AttentionBlock` (token-major: matmuls, no layout copies);
- EMA: one update of every UNet parameter by a Python loop of ``lerp_`` against one
  ``torch._foreach_lerp_`` (what the EMA callback does).

Variants alternate (A, B, A, B, ...) and each figure is the median of the repeats.

    python bench/kernels.py                 # CPU; appends rows to bench/results.md
    python bench/kernels.py --device cuda --no-record
"""

from __future__ import annotations

# ruff: noqa: I001  (common imports diffusion, which must precede lightning and torchvision)

from common import device_name, record, stamp  # first: imports diffusion

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from diffusion.nets.blocks import AttentionBlock, Dropout, qkv_attention
from diffusion.nets.unet import UNet


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def compare(before, after, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median seconds of ``before`` and ``after``, run alternately after one warm-up each."""
    before(), after()
    times: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(repeats):
        times["before"].append(timed(before, device))
        times["after"].append(timed(after, device))
    return statistics.median(times["before"]), statistics.median(times["after"])


def dropout_case(device):
    # the largest dropout input of the CIFAR UNet at batch 32: (32, 256, 16, 16), NHWC
    x = torch.randn(32, 256, 16, 16, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    layer = Dropout(0.3).train()
    return (lambda: F.dropout(x, 0.3, training=True).sum().backward(),
            lambda: layer(x).sum().backward())


def dropout_mask_case(device):
    # the same input; the mask as bool (what blocks.Dropout did before) against blocks.Dropout
    x = torch.randn(32, 256, 16, 16, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    layer = Dropout(0.3).train()

    def bool_mask():
        keep = torch.rand_like(x) >= 0.3
        (x * keep).mul_(1.0 / 0.7).sum().backward()

    return bool_mask, lambda: layer(x).sum().backward()


def attention_case(device):
    # 16x16 attention of the CIFAR UNet at batch 32: 256 channels, 4 heads of 64, T = 256
    b, heads, d, t = 32, 4, 64, 256
    qkv = torch.randn(b, t, 3 * heads * d, device=device, requires_grad=True)  # token-major
    channel_major = torch.randn(b, 3 * heads * d, t, device=device, requires_grad=True)

    def strided():  # before: q, k, v sliced from a channel-major (B, 3C, T) qkv, d strided
        q, k, v = channel_major.reshape(b, heads, 3, d, t).permute(2, 0, 1, 4, 3).unbind(0)
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    return strided, lambda: qkv_attention(qkv, heads).sum().backward()


def attention_block_case(device):
    # the CIFAR UNet's 16x16 attention block at batch 32, NHWC
    block = AttentionBlock(256, num_heads=4).to(device)
    nn.init.normal_(block.proj_out.weight, std=0.02)
    x = torch.randn(32, 256, 16, 16, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)

    def channel_major():  # before: Conv1d projections over (B, C, T); q, k, v and output copied
        b, c, h, w = x.shape
        flat = x.reshape(b, c, h * w)
        qkv = block.qkv(block.norm(flat))  # (B, 3C, T)
        q, k, v = qkv.reshape(b, 4, 3, c // 4, h * w).permute(2, 0, 1, 4, 3).contiguous().unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h * w)
        (flat + block.proj_out(a)).reshape(b, c, h, w).sum().backward()

    return channel_major, lambda: block(x).sum().backward()


def ema_case(device):
    net = UNet(image_size=32, in_channels=3, model_channels=128, out_channels=6, num_res_blocks=3,
               attention_resolutions=(16, 8), dropout=0.3, num_heads=4, use_scale_shift_norm=True)
    current = [p.detach().to(device) for p in net.parameters()]
    average = [p.clone() for p in current]

    @torch.no_grad()
    def loop():
        for a, c in zip(average, current, strict=True):
            a.lerp_(c, 1e-4)

    @torch.no_grad()
    def foreach():
        torch._foreach_lerp_(average, current, 1e-4)

    return loop, foreach


CASES = {
    "dropout p=0.3, (32, 256, 16, 16) NHWC, fwd+bwd": ("F.dropout (bernoulli_)", "blocks.Dropout (torch.rand)", dropout_case),
    "dropout mask p=0.3, (32, 256, 16, 16) NHWC, fwd+bwd": ("bool mask", "blocks.Dropout (0/1 mask of x's dtype)", dropout_mask_case),
    "attention 4 heads x 64, T=256, batch 32, fwd+bwd": ("strided q/k/v (math)", "blocks.qkv_attention (flash)", attention_case),
    "attention block 256 ch, 4 heads, 16x16, batch 32, NHWC, fwd+bwd": (
        "channel-major (Conv1d, copies)", "blocks.AttentionBlock (token-major)", attention_block_case),
    "EMA update of the CIFAR UNet (52.5M parameters)": ("loop of lerp_", "torch._foreach_lerp_", ema_case),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no-record", action="store_true", help="print only; leave bench/results.md alone")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    header = ["date", "commit", "torch", "os", "device", "case", "before", "after", "before ms", "after ms", "speed-up"]
    for case, (before_name, after_name, build) in CASES.items():
        before, after = compare(*build(device), device, args.repeats)
        print(f"{case}: {before_name} {before * 1e3:.2f} ms, {after_name} {after * 1e3:.2f} ms = x{before / after:.2f}")
        if not args.no_record:
            record("Kernel before/after (bench/kernels.py)", header,
                   [*stamp(), device_name(device), case, before_name, after_name,
                    f"{before * 1e3:.2f}", f"{after * 1e3:.2f}", f"x{before / after:.2f}"])


if __name__ == "__main__":
    main()
