"""The performance harness's report: the lines it prints and the rows it appends to
bench/results.md ("Training performance (MFU harness)", "Ablations", "Sampling throughput",
"Data loading"), each with the device, date, commit and the command line that reproduces it.

A report is the dict that performance.measure_preset returns: ``preset``, ``device``,
``train`` (a TrainRun), ``conv`` and ``matmul`` (Peaks), ``options``, ``command``,
``repeats``, ``sampler``, ``ablations`` (a list of Ablation), ``sampling``
((images/s, model evaluations, batch, precision) or None) and ``loader``
((images/s, num_workers) or None).
"""

from __future__ import annotations

import dataclasses

import torch
from ablations import Ablation
from device_peak import Peak
from train_timing import TrainRun

from common import device_name, record, stamp


def gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def tflops(x: float) -> str:
    return f"{x / 1e12:.3g}"


def summary(preset: str, device, run: TrainRun, conv: Peak, mm: Peak, options: str) -> str:
    lines = [
        f"== {preset} on {device_name(device)}: batch {run.batch}, precision {run.precision}, options: {options}",
        f"training      {run.images_per_s:.4g} images/s ({run.step_s * 1e3:.4g} ms/step)",
        f"model         {run.flops_per_image / 1e9:.4g} GFLOP/image (UNet forward + backward), "
        f"{run.params / 1e6:.3g}M parameters",
        f"achieved      {tflops(run.achieved)} TFLOP/s",
        f"device peak   conv 3x3 {tflops(conv.flops_per_s)} TFLOP/s ({conv.what}); "
        f"matmul {tflops(mm.flops_per_s)} TFLOP/s ({mm.what})",
        f"MFU           {run.achieved / conv.flops_per_s:.1%} of the conv peak, "
        f"{run.achieved / mm.flops_per_s:.1%} of the matmul peak",
        f"step split    forward {run.forward_s * 1e3:.4g} ms, backward {run.backward_s * 1e3:.4g} ms, "
        f"outside {(run.step_s - run.forward_s - run.backward_s) * 1e3:.4g} ms = "
        f"{run.share_outside:.1%} of the step",
        f"memory        peak {gib(run.peak_memory)} ({run.memory_kind}); "
        f"saved for backward {gib(run.saved_bytes)} per step",
    ]
    return "\n".join(lines)


def ablation_line(a: Ablation) -> str:
    return (f"ablation      {a.name}: {a.variant_rate:.4g} vs {a.baseline_rate:.4g} images/s = "
            f"x{a.ratio:.3f}; saved for backward {gib(a.variant.saved_bytes)} vs "
            f"{gib(a.baseline.saved_bytes)}, peak memory x{a.variant.peak_memory / a.baseline.peak_memory:.3f}"
            f"  ({a.compares})")


def sampling_line(sampling: tuple[float, int, int, str], sampler: str) -> str:
    rate, evals, batch, _ = sampling
    return f"sampling      {sampler} ({evals} evaluations): {rate:.4g} images/s at batch {batch}"


def loader_line(loader: tuple[float, int] | None, run: TrainRun) -> str:
    if loader is None:
        return "data loading  n/a (no writer of this dataset's files in bench/loader_rate.py)"
    rate, workers = loader
    return (f"data loading  {rate:.4g} images/s ({workers} workers) = x{rate / run.images_per_s:.3g} "
            "the training images/s (> 1: the loader keeps up)")


def as_json(report: dict) -> dict:
    """The report as plain numbers, with the derived figures (achieved FLOP/s, MFU, the share
    of a step outside the UNet) spelled out."""
    run, conv, mm = report["train"], report["conv"], report["matmul"]
    train = {**dataclasses.asdict(run), "achieved_flops_per_s": run.achieved, "share_outside": run.share_outside,
             "mfu_vs_conv": run.achieved / conv.flops_per_s, "mfu_vs_matmul": run.achieved / mm.flops_per_s}
    sampling, loader = report.get("sampling"), report.get("loader")
    return {
        **{key: report[key] for key in ("preset", "device", "options", "command", "sampler")},
        "torch": torch.__version__, "train": train,
        "conv_peak": dataclasses.asdict(conv), "matmul_peak": dataclasses.asdict(mm),
        "ablations": [{"name": a.name, "compares": a.compares, "baseline_images_per_s": a.baseline_rate,
                       "variant_images_per_s": a.variant_rate, "ratio": a.ratio} for a in report["ablations"]],
        "sampling": None if sampling is None else dict(zip(
            ("images_per_s", "model_evaluations", "batch", "precision"), sampling, strict=True)),
        "loader": None if loader is None else dict(zip(("images_per_s", "num_workers"), loader, strict=True)),
    }


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def record_rows(report: dict) -> None:
    run, dev, cmd = report["train"], report["device"], cell(report["command"])
    head = ["device", "date", "commit", "torch", "os", "preset"]
    first = [dev, *stamp(), report["preset"]]
    record("Training performance (MFU harness)",
           [*head, "batch", "precision", "options", "images/s", "GFLOP/image", "achieved TFLOP/s",
            "conv peak TFLOP/s", "matmul peak TFLOP/s", "MFU vs conv", "MFU vs matmul",
            "share outside fwd+bwd", "peak memory", "saved activations", "command"],
           [*first, str(run.batch), run.precision, cell(report["options"]), f"{run.images_per_s:.4g}",
            f"{run.flops_per_image / 1e9:.4g}", tflops(run.achieved), tflops(report["conv"].flops_per_s),
            tflops(report["matmul"].flops_per_s), f"{run.achieved / report['conv'].flops_per_s:.1%}",
            f"{run.achieved / report['matmul'].flops_per_s:.1%}", f"{run.share_outside:.1%}",
            f"{gib(run.peak_memory)} ({run.memory_kind})", gib(run.saved_bytes), f"`{cmd}`"])
    for a in report["ablations"]:
        record("Ablations",
               [*head, "batch", "variant", "compares", "rounds", "baseline img/s", "variant img/s",
                "ratio", "saved activations", "peak memory ratio", "command"],
               [*first, str(run.batch), a.name, cell(a.compares), str(report["repeats"]),
                f"{a.baseline_rate:.4g}", f"{a.variant_rate:.4g}", f"{a.ratio:.3f}",
                f"{gib(a.variant.saved_bytes)} vs {gib(a.baseline.saved_bytes)}",
                f"{a.variant.peak_memory / a.baseline.peak_memory:.3f}", f"`{cmd}`"])
    if report.get("sampling"):
        rate, evals, batch, precision = report["sampling"]
        record("Sampling throughput",
               ["date", "commit", "torch", "os", "device", "preset", "sampler", "model evaluations",
                "batch", "precision", "images/s"],
               # the run's options beside the precision (the table is shared with sample_throughput.py's
               # rows): gpu_check's eager and compiled stages differ only there
               [*stamp(), dev, report["preset"], report["sampler"], str(evals), str(batch),
                precision if report["options"] == "-" else f"{precision} ({cell(report['options'])})", f"{rate:.3g}"])
    if report.get("loader"):
        rate, workers = report["loader"]
        record("Data loading",
               [*head, "batch", "num_workers", "loader images/s", "training images/s", "loader/train", "command"],
               [*first, str(run.batch), str(workers), f"{rate:.4g}", f"{run.images_per_s:.4g}",
                f"{rate / run.images_per_s:.3g}", f"`{cmd}`"])
