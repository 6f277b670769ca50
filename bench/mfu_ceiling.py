"""How much of the CPU training MFU the memory-bound layers cost: an upper bound for fusing them.

The figures of bench/cpu_targets.py (fp32 training MFU against the 3x3-convolution peak) leave
a third of the step outside the convolutions. This script measures what the step would reach
if the UNet's GroupNorm, SiLU and dropout cost nothing at all (the best any fused kernel for
them could do): the same training runs as cpu_targets.py (fresh module and Trainer, the real
Lightning loop on synthetic batches), as they are and with those layers replaced by the
identity, in alternating rounds, the conv peak measured beside each run. The FLOPs counted
are the same in both (convolutions, matmuls and attention; these layers add none), and ADM's
AdaGN keeps its product and sum (only the normalisation goes).

    python bench/mfu_ceiling.py                          # both cpu_targets configurations
    python bench/mfu_ceiling.py --free silu dropout      # only these layers free
"""

from __future__ import annotations

# ruff: noqa: I001  (common imports diffusion, which must precede lightning and torchvision)

from common import device_name, record, stamp  # first: imports diffusion

import argparse
import contextlib
import shlex
import statistics
import sys
import tempfile
from unittest import mock

import torch
from torch import nn

import cpu_targets
from diffusion.nets import blocks
from performance import quiet

# layer name: the class whose forward becomes the identity
FREE_LAYERS = {"groupnorm": blocks.GroupNorm32, "silu": nn.SiLU, "dropout": blocks.Dropout}


def free(layers: list[str]) -> contextlib.ExitStack:
    """The named layers' forward is the identity inside the block (restored on the way out)."""
    stack = contextlib.ExitStack()
    for layer in layers:
        stack.enter_context(mock.patch.object(FREE_LAYERS[layer], "forward", lambda self, x: x))
    return stack


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--free", nargs="+", choices=sorted(FREE_LAYERS), default=sorted(FREE_LAYERS),
        help="the layers made free (default: all three)")
    add("--configs", nargs="+", type=int, metavar="INDEX",
        help=f"which of cpu_targets' configurations, by index (default: all): {dict(enumerate(cpu_targets.CONFIGS))}")
    add("--rounds", type=int, default=3, help="rounds of (as is, free) runs, alternating the order")
    add("--warmup", type=int, default=2)
    add("--steps", type=int, default=6)
    add("--no-record", action="store_true", help="print only; leave bench/results.md alone")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, device: torch.device, out: str) -> dict:
    """{config name: {"as is": [run per round], "free": [...]}}, each run's MFU against the
    higher of the conv peaks measured before and after it."""
    names = list(cpu_targets.CONFIGS)
    names = names if args.configs is None else [names[index] for index in args.configs]
    figures = {name: {"as is": [], "free": []} for name in names}
    peaks = [cpu_targets.conv_peak(device, torch.float32).flops_per_s]
    for round_index in range(args.rounds):
        order = ["as is", "free"] if round_index % 2 == 0 else ["free", "as is"]
        for name in names:
            cfg = cpu_targets.training_config(name, [], out)
            for variant in order:
                with free(args.free) if variant == "free" else contextlib.nullcontext():
                    run, peak = cpu_targets.run_between_peaks(cfg, device, args, peaks)
                mfu = run.achieved / peak
                figures[name][variant].append({"mfu": mfu, "images_per_s": run.images_per_s,
                                               "flops_per_image": run.flops_per_image})
                print(f"round {round_index + 1}: {name}, {variant}: {run.images_per_s:.3g} images/s, "
                      f"MFU {mfu:.1%}", flush=True)
    return figures


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    quiet()
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as scratch:  # the runs' output directory, thrown away
        figures = measure(args, device, scratch)
    freed = ", ".join(args.free)
    command = shlex.join(["python", "bench/mfu_ceiling.py", *argv])
    print(f"\n{device_name(device)}, torch {torch.__version__}; free: {freed}")
    summary = {}
    for name, runs in figures.items():
        as_is, ceiling = (statistics.median(run["mfu"] for run in runs[variant]) for variant in ("as is", "free"))
        summary[name] = {"as_is": as_is, "free": ceiling, "runs": runs}
        rounds = " / ".join(f"{a['mfu']:.1%} vs {f['mfu']:.1%}"
                            for a, f in zip(runs["as is"], runs["free"], strict=True))
        print(f"  {name}: MFU {as_is:.1%} as is, {ceiling:.1%} with {freed} free ({rounds})")
        if not args.no_record:
            record("MFU ceiling: the CPU step with memory-bound layers free (bench/mfu_ceiling.py)",
                   ["date", "commit", "torch", "os", "device", "configuration", "free", "MFU as is",
                    "MFU with them free", "rounds (as is vs free)", "command"],
                   [*stamp(), device_name(device), name, freed, f"{as_is:.1%}", f"{ceiling:.1%}",
                    rounds, f"`{command}`"])
    return summary


if __name__ == "__main__":
    main()
