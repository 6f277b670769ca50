"""The device's peak FLOP/s in a run's compute dtype: the best of a few large square matmuls,
and the best of a few large 3x3 convolutions in both memory formats (contiguous,
channels_last) with cuDNN's autotuner on.

FLOPs are nominal (2n³; 2·N·C²·9·H·W), so a Winograd or FFT convolution may beat the matmul
peak. Measure after a training run, in the same process: warm, and under its TF32 settings.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import torch
import torch.nn.functional as F

COMPUTE_DTYPES = {"32": torch.float32, "32-true": torch.float32, "bf16": torch.bfloat16,
                  "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16": torch.float16,
                  "16-mixed": torch.float16, "16-true": torch.float16, "64": torch.float64,
                  "64-true": torch.float64}
# Large enough to saturate the device (and small enough for a 2-core CPU).
MATMUL_SIZES = {"cuda": (4096, 8192, 16384), "cpu": (1024, 2048)}
CONV_SHAPES = {"cuda": ((128, 256, 64, 64), (128, 512, 32, 32), (256, 1024, 16, 16)),
               "cpu": ((8, 128, 32, 32), (16, 256, 16, 16))}  # (N, C_in = C_out, H, W)
TIMING_SECONDS = {"cuda": 0.5, "cpu": 0.2}


@dataclasses.dataclass
class Peak:
    flops_per_s: float
    what: str  # the configuration that reached it


def compute_dtype(precision) -> torch.dtype:
    """The dtype the matmuls and convolutions of a run at ``trainer.precision`` compute in."""
    if str(precision) not in COMPUTE_DTYPES:
        raise ValueError(f"trainer.precision={precision!r} is not one of {sorted(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[str(precision)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(call, device: torch.device, repeats: int = 3) -> float:
    """The best of ``repeats`` timings of a loop of calls lasting at least TIMING_SECONDS."""
    def loop(n: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(n):
            call()
        synchronize(device)
        return time.perf_counter() - start

    loop(1)  # warm-up: allocations, cuDNN's algorithm search
    n = 1
    while (elapsed := loop(n)) < TIMING_SECONDS[device.type]:
        n *= 2
    return min(elapsed, *(loop(n) for _ in range(repeats - 1))) / n


def tf32_note(device: torch.device, dtype: torch.dtype) -> str:
    if device.type != "cuda" or dtype != torch.float32:
        return ""
    return (f", cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
            f"matmul precision {torch.get_float32_matmul_precision()}")


@torch.inference_mode()
def matmul_peak(device: torch.device, dtype: torch.dtype, sizes=None) -> Peak:
    """The best FLOP/s of square matmuls (2n³ FLOPs each) over a few sizes."""
    best = Peak(0.0, "")
    for n in sizes or MATMUL_SIZES[device.type]:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        rate = 2 * n**3 / seconds_per_call(functools.partial(torch.mm, a, b), device)
        if rate > best.flops_per_s:
            best = Peak(rate, f"{str(dtype).removeprefix('torch.')} {n}x{n}{tf32_note(device, dtype)}")
    return best


@torch.inference_mode()
def conv_peak(device: torch.device, dtype: torch.dtype, shapes=None) -> Peak:
    """The best FLOP/s of 3x3 convolutions (C -> C channels, padding 1: 2·N·C²·9·H·W FLOPs)
    over a few shapes, in both memory formats, with cuDNN's autotuner on."""
    best = Peak(0.0, "")
    autotune = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        for n, c, h, w in shapes or CONV_SHAPES[device.type]:
            for layout in (torch.contiguous_format, torch.channels_last):
                x = torch.randn(n, c, h, w, device=device, dtype=dtype).contiguous(memory_format=layout)
                weight = torch.randn(c, c, 3, 3, device=device, dtype=dtype).contiguous(memory_format=layout)
                call = functools.partial(F.conv2d, x, weight, padding=1)
                rate = 2 * n * c * c * 9 * h * w / seconds_per_call(call, device)
                if rate > best.flops_per_s:
                    name = "channels_last" if layout == torch.channels_last else "contiguous"
                    what = f"{str(dtype).removeprefix('torch.')} {n}x{c}x{h}x{w} {name}"
                    best = Peak(rate, what + tf32_note(device, dtype))
    finally:
        torch.backends.cudnn.benchmark = autotune
    return best
