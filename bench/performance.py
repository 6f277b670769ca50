"""Training and sampling performance of the experiment presets, against the device's own limit.

For each preset, on the device it runs on, one run of this harness reports:

1. training images/s at a stated batch through the real Lightning loop: the preset's module,
   its trainer settings (precision, clipping, accumulation) and its EMA callback, without
   checkpoints, validation, loggers or progress bar. Synthetic batches of the preset's shape,
   built once on the device, stand in for the data (loading is item 7). Warm-up steps are
   discarded. (train_timing.py)
2. the UNet's FLOPs per image for one training step (forward + backward of the UNet only),
   counted by torch.utils.flop_counter.FlopCounterMode on a meta-device copy (exact, no
   compute) with gradient checkpointing off: model FLOPs, not recomputed ones. Achieved
   FLOP/s = FLOPs/image x images/s. (step_costs.py)
3. the device's peak in the run's compute dtype (float32 for 32-true, bfloat16 for bf16-*,
   float16 for 16-*), measured in the same process and under the same TF32 settings: the best
   of a few large square matmuls, and the best of a few large 3x3 convolutions, each in both
   memory formats (contiguous, channels_last) with cuDNN autotuning on. FLOPs are nominal
   (2n³; 2·N·C²·9·H·W), so a Winograd or FFT convolution may beat the matmul peak. Model-FLOPs
   utilisation (MFU) = achieved / conv peak, also given against the matmul peak. (device_peak.py)
4. the share of a step spent outside the UNet's forward and backward (diffusion math,
   t-sampler, EMA, optimizer, Lightning), by instrumentation of one run: a step is the time
   between consecutive on_train_batch_start; the forward is the module's `denoiser` (wrapped
   on the instance); the backward runs from on_before_backward to on_after_backward. CUDA
   events on the GPU (resolved after the run: no synchronisation inside a step),
   time.perf_counter on the CPU. share_outside = 1 - (forward + backward) / step. (On a
   GPU that waits for kernel launches, the wait counts where it happens.) (train_timing.py)
5. peak memory: torch.cuda.max_memory_allocated on CUDA (reset before the run); on the CPU
   the process's peak RSS (VmHWM, reset before the run where Linux allows it, else
   getrusage's peak since start; either includes the interpreter and libraries). And the
   bytes that autograd saves for backward in one training loss, parameters excluded, each
   storage once, in eager mode under the run's precision: what gradient checkpointing reduces
   (a checkpointed block's input, kept alive by the checkpoint, is not among them). (step_costs.py)
6. sampling images/s at a stated batch, DDIM-50 unless --sampler says otherwise, with the
   config's UNet and precision (bench/sample_throughput.py's measure_config).
7. images/s of the preset's real training loader (its dataset's transforms, num_workers) on
   files written in the dataset's on-disk format (dataset_files.py) to a temporary folder
   (digits: in memory), over the training images/s: > 1 means the loader can keep the model
   fed. The first batches (worker start-up) are discarded; batches the workers prefetched
   meanwhile count. (loader_rate.py)

Ablations (--ablate; ablations.py): each variant is a pair of override lists (feature on,
feature off) in VARIANTS, applied on top of the run's own overrides. Every distinct config is
measured once per round, in the same process; rounds alternate the order (forward, then
reversed) so that drifts (clocks, temperature, caches) fall on both sides, and a variant's
ratio is the median over rounds of on/off measured in the same round. Each measurement starts
a fresh module, Trainer and torch.compile cache (compilation happens inside the warm-up steps).

Examples:

    python bench/performance.py                                  # both presets on the CPU
    python bench/performance.py --device cuda --precision bf16-mixed --channels-last
    python bench/performance.py --device cuda --presets cifar_cosine_learned_sigma \\
        --ablate channels_last,bf16,compile,fused,grad_checkpoint --repeats 3
    python bench/performance.py --device cuda --override matmul_precision=high --compile
    python bench/performance.py --presets digits_quickstart --batch 4 --steps 2 --warmup 1 \\
        --sample-batch 2 --loader-batches 2 --no-record            # a smoke run

Unless --no-record, rows go to bench/results.md ("Training performance (MFU harness)",
"Ablations", "Sampling throughput", "Data loading"), or to the file --results names, each
with the device, date, commit and the command line that reproduces it
(performance_report.py); --json PATH writes every figure as JSON too (bench/gpu_check.sh).
"""

from __future__ import annotations

# ruff: noqa: I001  (common imports diffusion, which must precede lightning and torchvision)

import common
from common import compose_preset, device_name  # first: imports diffusion

import argparse
import functools
import json
import logging
import shlex
import tempfile
import warnings
from pathlib import Path

import hydra
import torch

import sample_throughput
from ablations import VARIANTS, ablate
from diffusion.utils.atomic import atomic_write
from device_peak import Peak, compute_dtype, conv_peak, matmul_peak
from loader_rate import loader_rate
from performance_report import ablation_line, as_json, loader_line, record_rows, sampling_line, summary
from train_timing import train_once

PRESETS = ("cifar_cosine_learned_sigma", "digits_quickstart")
# Defaults by device type: (warm-up steps, timed steps), and batches where 128 / 256 do not fit.
STEPS = {"cuda": (10, 50), "cpu": (3, 20)}
BATCH = {("cpu", "cifar_cosine_learned_sigma"): 8}
SAMPLE_BATCH = {("cpu", "cifar_cosine_learned_sigma"): 16}
SAMPLE_PRECISION = {torch.float32: "32", torch.bfloat16: "bf16", torch.float16: "16"}
FLAGS = ("channels_last", "compile", "grad_checkpoint")  # --channels-last etc.: the variant's "on" overrides
SKIPPABLE = ("sampling", "data")


def comma_list(choices):
    def parse(text: str) -> list[str]:
        names = [name for name in text.split(",") if name]
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"{', '.join(unknown)}: not one of {', '.join(choices)}")
        return names

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--presets", nargs="+", default=list(PRESETS), help="experiment presets (conf/experiment/)")
    add("--device", default="cpu", choices=["cpu", "cuda"])
    add("--batch", type=int, help="training batch (default 128; 8 for the CIFAR preset on the CPU)")
    add("--warmup", type=int, help="discarded steps (default 10 on CUDA, 3 on the CPU)")
    add("--steps", type=int, help="timed steps (default 50 on CUDA, 20 on the CPU)")
    add("--override", action="append", default=[], metavar="KEY=VALUE",
        help="a Hydra override of the composed train config (repeatable)")
    add("--precision", help="trainer.precision: 32-true | bf16-mixed | 16-mixed")
    add("--channels-last", action="store_true", help="model.channels_last=true")
    add("--compile", action="store_true", help="model.compile=true")
    add("--grad-checkpoint", action="store_true", help="model.use_checkpoint=true")
    add("--compile-backend", metavar="NAME",
        help="torch.compile backend of model.compile=true (default: inductor); aot_eager traces the "
             "step without generating kernels, for a smoke run of the compiled path on a small CPU")
    add("--ablate", type=comma_list(VARIANTS), default=[], metavar="NAME[,NAME...]",
        help=f"variants to compare in this process: {', '.join(VARIANTS)}")
    add("--repeats", type=int, default=3, help="ablation rounds (default 3)")
    add("--sampler", default="ddim50", help="sampler of the sampling figure (configs/sampler/)")
    add("--sample-batch", type=int, help="sampling batch (default 256; 16 for CIFAR on the CPU)")
    add("--sample-max-seconds", type=float, default=60.0,
        help="a longer sampling run is estimated from a 10-step one (sample_throughput.py)")
    add("--loader-batches", type=int, default=50, help="timed data-loader batches (default 50)")
    add("--skip", type=comma_list(SKIPPABLE), default=[], metavar="PART[,PART]",
        help=f"leave out parts: {', '.join(SKIPPABLE)}")
    add("--no-record", action="store_true", help="print only; leave bench/results.md alone")
    add("--results", metavar="PATH", help="append the rows to PATH instead of bench/results.md")
    add("--json", metavar="PATH", help="also write every figure of the run to PATH as JSON")
    add("--peaks-from", metavar="PATH",
        help="the device's peaks from an earlier --json of the same device, instead of measuring them again")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    warmup, steps = STEPS[args.device]
    args.warmup = warmup if args.warmup is None else args.warmup
    args.steps = steps if args.steps is None else args.steps
    return args


def run_overrides(args: argparse.Namespace) -> list[str]:
    """--override values, then the convenience flags (later overrides win)."""
    overrides = list(args.override)
    if args.precision:
        overrides.append(f"trainer.precision={args.precision}")
    for flag in FLAGS:
        if getattr(args, flag):
            overrides.extend(VARIANTS[flag][0])
    return overrides


def command_line(args: argparse.Namespace, preset: str, batch: int, sample_batch: int) -> str:
    argv = ["python", "bench/performance.py", "--presets", preset, "--device", args.device,
            "--batch", str(batch), "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--sampler", args.sampler, "--sample-batch", str(sample_batch),
            "--loader-batches", str(args.loader_batches)]
    for override in run_overrides(args):
        argv += ["--override", override]
    if args.compile_backend:
        argv += ["--compile-backend", args.compile_backend]
    if args.ablate:
        argv += ["--ablate", ",".join(args.ablate), "--repeats", str(args.repeats)]
    if args.skip:
        argv += ["--skip", ",".join(args.skip)]
    return shlex.join(argv)


def sampling_rate(cfg, device: torch.device, batch: int, sampler: str, max_seconds: float):
    """(images/s, model evaluations) of ``sampler`` with the config's UNet, under its precision."""
    like = hydra.utils.instantiate(cfg.data)
    precision = SAMPLE_PRECISION.get(compute_dtype(cfg.trainer.precision), "32")
    return sample_throughput.measure_config(cfg, like.image_size, like.channels, sampler, batch,
                                            str(device), precision, max_seconds)


def measure_preset(preset: str, args: argparse.Namespace, device: torch.device, peaks: dict,
                   progress=lambda report: None) -> dict:
    """Every figure of one preset (the report performance_report describes), printed as it
    comes; ``peaks`` caches the device's peaks by dtype. ``progress(report)`` gets the report
    as far as it goes after each part, so that a run stopped later (a time limit) keeps it."""
    batch = args.batch or BATCH.get((device.type, preset), 128)
    sample_batch = args.sample_batch or SAMPLE_BATCH.get((device.type, preset), 256)
    base = [*run_overrides(args), f"data.batch_size={batch}"]
    with tempfile.TemporaryDirectory() as out:
        cfg = compose_preset(preset, base, out)
        run = train_once(cfg, device, args.warmup, args.steps)
        dtype = compute_dtype(cfg.trainer.precision)
        if dtype not in peaks:  # after training: the same process, warm, same TF32 settings
            peaks[dtype] = (conv_peak(device, dtype), matmul_peak(device, dtype))
        report = {"preset": preset, "device": device_name(device), "train": run, "conv": peaks[dtype][0],
                  "matmul": peaks[dtype][1], "options": " ".join(run_overrides(args)) or "-",
                  "command": command_line(args, preset, batch, sample_batch), "repeats": args.repeats,
                  "sampler": args.sampler, "ablations": [], "sampling": None, "loader": None}
        print(summary(preset, device, run, report["conv"], report["matmul"], report["options"]), flush=True)
        progress(report)
        if args.ablate:
            report["ablations"] = ablate(preset, base, args.ablate, device, warmup=args.warmup,
                                         steps=args.steps, repeats=args.repeats, out=out)
            print("\n".join(ablation_line(a) for a in report["ablations"]), flush=True)
            progress(report)
        if "sampling" not in args.skip:
            rate, evals = sampling_rate(cfg, device, sample_batch, args.sampler, args.sample_max_seconds)
            report["sampling"] = (rate, evals, sample_batch, SAMPLE_PRECISION.get(dtype, "32"))
            print(sampling_line(report["sampling"], args.sampler), flush=True)
            progress(report)
        if "data" not in args.skip:
            report["loader"] = loader_rate(cfg, args.warmup, args.loader_batches)
            print(loader_line(report["loader"], run), flush=True)
    return report


def quiet() -> None:
    """Lightning's start-up banner and the warnings a short synthetic run triggers."""
    logging.getLogger("lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    for message in ("does not have many workers", "smaller than the logging interval", "pin_memory",
                    "no `val_dataloader`", "`isinstance\\(treespec, LeafSpec\\)` is deprecated"):
        warnings.filterwarnings("ignore", message=f".*{message}")


def load_peaks(path: str) -> dict:
    """{dtype: (conv Peak, matmul Peak)} from an earlier --json; a Peak's ``what`` begins with its dtype."""
    peaks = {}
    for report in json.loads(Path(path).read_text()):
        conv, matmul = Peak(**report["conv_peak"]), Peak(**report["matmul_peak"])
        peaks[getattr(torch, conv.what.split()[0])] = (conv, matmul)
    return peaks


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    quiet()
    device, reports = torch.device(args.device), []
    peaks = load_peaks(args.peaks_from) if args.peaks_from else {}
    if args.compile_backend:  # DiffusionModule compiles with nn.Module.compile() and its defaults
        torch.nn.Module.compile = functools.partialmethod(torch.nn.Module.compile, backend=args.compile_backend)
    if args.results:
        common.RESULTS = Path(args.results)

    def write_json(partial: dict | None = None) -> None:
        # after each part of each preset: a later failure or time-out keeps what was measured
        if args.json:
            done = reports + ([partial] if partial is not None else [])
            with atomic_write(args.json, "w") as handle:
                handle.write(json.dumps([as_json(r) for r in done], indent=1) + "\n")

    for preset in args.presets:
        reports.append(measure_preset(preset, args, device, peaks, progress=write_json))
        if not args.no_record:
            record_rows(reports[-1])
        write_json()
    return reports


if __name__ == "__main__":
    main()
