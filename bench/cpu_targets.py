"""The CPU figures of the GPU-readiness issue's item 3, side by side in one run.

1. Training MFU in fp32 of two UNets against the 3x3-convolution peak measured in the same
   process (device_peak.conv_peak): the CIFAR preset at batch 8, and the same preset with 64
   channels, 2 blocks and attention at 16 only at batch 16. Target: at least 68% each.
2. ``sample.py`` of a checkpoint (the quickstart's), DDIM-50 over 1000 images with start-up,
   against the bare sampling loop at the same batch (bench/sample_end_to_end.py). Target: at
   least 80% of the loop's images/s.

A CPU's speed drifts during a run (clocks, a neighbour on a shared host), by about as much as
the margins in question, so the training part runs in ``--rounds`` rounds, the configurations
in alternating order, with the conv peak measured before, between and after them. Each
training run (a fresh module and Trainer, through the real Lightning loop on synthetic
batches: train_timing.py) is divided by the higher of the two peaks beside it; a figure is
the median over rounds. The MFU against the highest peak of the whole run is printed too
(the most conservative reading).

    python bench/cpu_targets.py --ckpt outputs/digits_quickstart/<run>/checkpoints/last.ckpt
    python bench/cpu_targets.py --rounds 1 --steps 2 --no-record            # training only
"""

from __future__ import annotations

# ruff: noqa: I001  (common imports diffusion, which must precede lightning and torchvision)

from common import compose_preset, device_name, record, stamp  # first: imports diffusion

import argparse
import json
import shlex
import statistics
import sys
import tempfile

import torch

import sample_end_to_end
from device_peak import conv_peak
from diffusion.utils.atomic import atomic_write
from performance import quiet
from train_timing import train_once

PRESET = "cifar_cosine_learned_sigma"
# name: (batch, overrides of the CIFAR preset)
CONFIGS = {
    "CIFAR preset (128 ch, 3 blocks, attention at 16 and 8)": (8, []),
    "64 ch, 2 blocks, attention at 16": (16, ["model.model_channels=64", "model.num_res_blocks=2",
                                             "model.attention_resolutions=[16]"]),
}
MFU_TARGET, SAMPLE_TARGET = 0.68, 0.80


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--rounds", type=int, default=3, help="rounds of training runs, alternating the order (default 3)")
    add("--warmup", type=int, default=2, help="discarded steps of each training run")
    add("--steps", type=int, default=6, help="timed steps of each training run")
    add("--override", action="append", default=[], metavar="KEY=VALUE",
        help="a Hydra override of both training configs (e.g. model.channels_last=false)")
    add("--ckpt", help="a train.py checkpoint for the sample.py figure (the quickstart's last.ckpt); "
                       "without it only the training figures are measured")
    add("--sampler", default="ddim50")
    add("--num-samples", type=int, default=1000)
    add("--sample-batch", type=int, default=256)
    add("--pairs", type=int, default=3, help="alternating (sample.py, loop) pairs")
    add("--no-record", action="store_true", help="print only; leave bench/results.md alone")
    add("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    return parser.parse_args(argv)


def training_config(name: str, overrides: list[str], out: str):
    """The composed training config of ``CONFIGS[name]``: the preset in fp32 on synthetic data."""
    batch, own = CONFIGS[name]
    return compose_preset(PRESET, ["data=synthetic", *own, *overrides, f"data.batch_size={batch}",
                                   "trainer.precision=32-true"], out)


def run_between_peaks(cfg, device: torch.device, args: argparse.Namespace, peaks: list[float]):
    """``train_once(cfg)``, then the conv peak again (appended to ``peaks``, whose last entry was
    measured just before the run): (the run, the higher of the two peaks beside it)."""
    run = train_once(cfg, device, args.warmup, args.steps)
    peaks.append(conv_peak(device, torch.float32).flops_per_s)
    return run, max(peaks[-2:])


def training_rounds(args: argparse.Namespace, device: torch.device, out: str) -> dict:
    """{config name: {"runs": [...], "peaks": [...]}} over the rounds (see the module's doc)."""
    peaks = [conv_peak(device, torch.float32).flops_per_s]
    figures = {name: [] for name in CONFIGS}
    for round_index in range(args.rounds):
        order = list(CONFIGS) if round_index % 2 == 0 else list(reversed(CONFIGS))
        for name in order:
            batch = CONFIGS[name][0]
            run, peak = run_between_peaks(training_config(name, args.override, out), device, args, peaks)
            figures[name].append({"round": round_index + 1, "batch": batch, "images_per_s": run.images_per_s,
                                  "flops_per_image": run.flops_per_image, "achieved": run.achieved,
                                  "peak": peak, "mfu": run.achieved / peak, "share_outside": run.share_outside})
            print(f"round {round_index + 1}: {name}, batch {batch}: {run.images_per_s:.3g} images/s, "
                  f"{run.achieved / 1e12:.3g} TFLOP/s, conv peak beside it {peak / 1e12:.3g} TFLOP/s: "
                  f"MFU {run.achieved / peak:.1%}", flush=True)
    best = max(peaks)
    summary = {}
    for name, runs in figures.items():
        summary[name] = {
            "runs": runs, "batch": runs[0]["batch"],
            "images_per_s": statistics.median(r["images_per_s"] for r in runs),
            "mfu": statistics.median(r["mfu"] for r in runs),
            "mfu_vs_best_peak": statistics.median(r["achieved"] for r in runs) / best,
            "share_outside": statistics.median(r["share_outside"] for r in runs),
        }
    return {"configs": summary, "peaks": peaks}


def command_line(argv: list[str]) -> str:
    return shlex.join(["python", "bench/cpu_targets.py", *argv])


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    quiet()
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as out:
        training = training_rounds(args, device, out)
    sampling = None
    if args.ckpt:
        sampling = sample_end_to_end.measure(sample_end_to_end.parse_args(
            ["--ckpt", args.ckpt, "--sampler", args.sampler, "--num-samples", str(args.num_samples),
             "--batch", str(args.sample_batch), "--repeats", str(args.pairs), "--breakdown-runs", "0",
             "--no-progress"]))
    where, when = device_name(device), stamp()
    peaks = training["peaks"]
    print(f"\n{where}, torch {torch.__version__}; conv peaks over the run {min(peaks) / 1e12:.3g} to "
          f"{max(peaks) / 1e12:.3g} TFLOP/s ({len(peaks)} measurements)")
    rows = []
    for name, fig in training["configs"].items():
        verdict = "met" if fig["mfu"] >= MFU_TARGET else "not met"
        per_round = " ".join(f"{run['mfu']:.1%}" for run in fig["runs"])
        print(f"  {name}, batch {fig['batch']}: {fig['images_per_s']:.3g} images/s, MFU {fig['mfu']:.1%} "
              f"(rounds {per_round}; {fig['mfu_vs_best_peak']:.1%} of the run's highest peak): "
              f"target {MFU_TARGET:.0%} {verdict}")
        rows.append([name, str(fig["batch"]), f"{fig['images_per_s']:.3g}", f"{fig['mfu']:.1%}",
                     per_round, f"{fig['mfu_vs_best_peak']:.1%}",
                     f"{fig['share_outside']:.1%}", f">= {MFU_TARGET:.0%}: {verdict}"])
    if sampling:
        verdict = "met" if sampling["ratio"] >= SAMPLE_TARGET else "not met"
        print(f"  sample.py {args.sampler}, {args.num_samples} images at batch {args.sample_batch}: "
              f"{sampling['sample_py_images_per_s']:.3g} images/s against the loop's "
              f"{sampling['loop_images_per_s']:.3g}: {sampling['ratio']:.1%}: target {SAMPLE_TARGET:.0%} {verdict}")
        rows.append([f"sample.py {args.sampler}, {args.num_samples} images, start-up included, vs the bare loop",
                     str(args.sample_batch), f"{sampling['sample_py_images_per_s']:.3g} (loop "
                     f"{sampling['loop_images_per_s']:.3g})",
                     f"{sampling['ratio']:.1%} (median of pairs; of the medians {sampling['ratio_of_medians']:.1%})",
                     " ".join(f"{r:.1%}" for r in sampling["pair_ratios"]), "-", "-",
                     f">= {SAMPLE_TARGET:.0%}: {verdict}"])
    result = {"device": where, "torch": torch.__version__, "stamp": when, "command": command_line(argv),
              "training": training, "sampling": sampling}
    if args.json:
        with atomic_write(args.json, "w") as handle:
            handle.write(json.dumps(result, indent=1) + "\n")
    if not args.no_record:
        header = ["date", "commit", "torch", "os", "device", "figure", "batch", "images/s",
                  "MFU vs the conv peak beside it / sample.py vs loop", "rounds / pairs", "MFU vs the run's highest peak",
                  "step outside fwd+bwd", "target", "command"]
        for row in rows:
            record("Issue 17 item 3 on the CPU, side by side in one run (bench/cpu_targets.py)", header,
                   [*when, where, *row, f"`{command_line(argv)}`"])
    return result


if __name__ == "__main__":
    main()
