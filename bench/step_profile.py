"""Where a training step's time goes, and what each run-time option buys: a GPU diagnosis.

For one preset (the CIFAR one by default) on synthetic batches, through the real Lightning
loop (train_timing.py):

1. images/s of each variant (``--variant NAME=OVERRIDE,OVERRIDE``; the base run first), every
   one a fresh module and Trainer in this process, its ratio to the base run beside it;
2. torch.profiler over ``--profile-steps`` steps of the base run: the device's busy share of
   the wall time (kernel time summed / wall: far below 1 means the GPU waits for the Python
   side to launch kernels), and the operators that take the most device and host time.

    python bench/step_profile.py --device cuda --override trainer.precision=bf16-mixed \\
        --variant fused=module.optimizer.fused=true --variant cudnn_benchmark=+trainer.benchmark=true

Nothing is recorded in bench/results.md: these are diagnoses, the MFU harness
(performance.py) gives the figures that are.
"""

from __future__ import annotations

# ruff: noqa: I001  (common imports diffusion, which must precede lightning and torchvision)

from common import compose_preset, device_name  # first: imports diffusion

import argparse
import tempfile
import time

import hydra
import lightning as L
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

from diffusion.training.run import build_module
from performance import quiet
from train_timing import STEP_CALLBACKS, make_trainer, synthetic_loader, train_once


class ProfileSteps(L.Callback):
    """Steps the profiler at each batch end and times the active window on the wall clock."""

    def __init__(self, profiler, device: torch.device, warmup: int, steps: int):
        self.profiler, self.device, self.warmup, self.steps = profiler, device, warmup, steps
        self.begin = self.wall = None

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.sync()
            self.begin = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.warmup + self.steps - 1:
            self.sync()
            self.wall = time.perf_counter() - self.begin
        self.profiler.step()


def profile_run(cfg, device: torch.device, warmup: int, steps: int, rows: int) -> str:
    """The profiler's tables over ``steps`` steps after ``warmup``, and the device's busy share."""
    like = hydra.utils.instantiate(cfg.data)
    module = build_module(cfg, like)
    loader = synthetic_loader(like, int(cfg.data.batch_size), warmup + steps + 1, device)
    keep = [hydra.utils.instantiate(cfg.callbacks[name]) for name in STEP_CALLBACKS
            if cfg.get("callbacks") and cfg.callbacks.get(name)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1)) as prof:
        marks = ProfileSteps(prof, device, warmup, steps)
        with tempfile.TemporaryDirectory() as root:
            make_trainer(cfg, device, [*keep, marks], root).fit(module, train_dataloaders=loader)
    averages = prof.key_averages()
    lines = [f"profiled {steps} steps: {marks.wall / steps * 1e3:.1f} ms/step on the wall clock (profiler on)"]
    if device.type == "cuda":
        # The kernels alone: an operator's row repeats its kernels' time (profiler_util's total).
        kernels = [e for e in averages if e.device_type == DeviceType.CUDA]
        busy = sum(e.self_device_time_total for e in kernels) / 1e6  # microseconds -> s
        launches = sum(e.count for e in kernels)
        lines.append(f"device busy {busy / steps * 1e3:.1f} ms/step = {busy / marks.wall:.0%} of the wall "
                     f"(profiler on); {launches / steps:.0f} kernels/step")
        lines.append(averages.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))
    lines.append(averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cifar_cosine_learned_sigma")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--override", action="append", default=[], help="a Hydra override for every run")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=OVERRIDE[,OVERRIDE...]: a run with these overrides on top of the base")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile-steps", type=int, default=5, help="0: no profile")
    parser.add_argument("--rows", type=int, default=25)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    variants = [("base", [])]
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        if not overrides:
            raise SystemExit(f"--variant {spec!r}: expected NAME=OVERRIDE[,OVERRIDE...]")
        variants.append((name, overrides.split(",")))
    quiet()
    out = tempfile.mkdtemp(prefix="step_profile_")
    base_rate = None
    print(f"{args.preset} on {device_name(device)}, torch {torch.__version__}; overrides: {args.override}", flush=True)
    for name, extra in variants:
        begin = time.perf_counter()
        try:
            cfg = compose_preset(args.preset, ["data=synthetic", *args.override, *extra], out)
            run = train_once(cfg, device, args.warmup, args.steps)
        except Exception as error:  # a variant that fails is reported, and the others still run
            print(f"{name:>20}: failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}", flush=True)
            continue
        base_rate = base_rate or run.images_per_s
        print(f"{name:>20}: {run.images_per_s:8.1f} images/s (x{run.images_per_s / base_rate:.2f}), "
              f"{run.step_s * 1e3:.1f} ms/step, forward {run.forward_s * 1e3:.1f} ms, backward "
              f"{run.backward_s * 1e3:.1f} ms, outside {run.share_outside:.0%}; batch {run.batch}; "
              f"{time.perf_counter() - begin:.0f} s with set-up ({' '.join(extra)})", flush=True)
    if args.profile_steps:
        cfg = compose_preset(args.preset, ["data=synthetic", *args.override], out)
        print(profile_run(cfg, device, args.warmup, args.profile_steps, args.rows), flush=True)


if __name__ == "__main__":
    main()
