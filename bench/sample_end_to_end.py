"""sample.py end to end (a fresh process, start-up included) against the bare sampling loop.

Issue 17, item 3: ``sample.py`` should run at no less than 80% of the images/s of the bare
sampling loop at the same batch size. Both are timed here, alternately, ``--repeats`` times,
and the ratio is the median of the pairs' ratios (the ratio of the two medians is printed too):

- sample.py: ``python sample.py ckpt=... sampler=... num_samples=N batch_size=B`` as a
  subprocess writing into a temporary folder, timed from just before the process is started
  to its exit (interpreter, imports, Hydra, checkpoint, sampling, shards, npz, grid, exit);
- the loop: in this process, the checkpoint loaded once (not timed), then the sampler over
  the same N images in batches of B, each drawn from the job's per-batch generator
  (`batch_generator`) under inference_mode, with no I/O. One batch is run first as a
  warm-up, so the loop is at its steady rate.

Then ``--breakdown-runs`` more sample.py runs are made through a wrapper (``--timeline``, a
child mode of this script) that stamps the job's stages, and the median breakdown is printed:
where sample.py's time goes beyond the loop. CPU seconds (user + system) are reported beside
the wall clock: on a machine shared with other jobs they measure the work, which the others
do not stretch (with one thread; several threads add their spin-waits). Both inherit this
process's thread settings; set ``OMP_NUM_THREADS`` for both or pass ``--threads``.

    python bench/sample_end_to_end.py --ckpt outputs/.../checkpoints/last.ckpt
    python bench/sample_end_to_end.py --ckpt ... --batch 256 --num-samples 1000 --repeats 3 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

# Only the standard library at module level: the --timeline child must start as sample.py does.
REPO = Path(__file__).resolve().parents[1]
# Packages whose import the stamped run reports: torchvision (with torch._dynamo and sympy) is
# the grid's (utils/images.py, about 1 s); the others sample.py must never need.
HEAVY_MODULES = ("torchvision", "torch._dynamo", "lightning", "torchmetrics", "scipy", "matplotlib", "sklearn",
                 "sympy")


# ------------------------------------------------------------------------------ the child
def run_timeline_child(marks_path: str, overrides: list[str]) -> None:
    """Run sample.py's entry point with ``overrides``, stamping its stages into ``marks_path``
    (JSON): wall-clock marks and the summed seconds of the job's functions."""
    marks: dict = {"child_start": time.time(), "seconds": {}, "batches": []}
    import diffusion.cli.sample as cli  # everything that sample.py imports

    marks["imported"] = time.time()
    from diffusion.jobs import sample as job

    seconds = marks["seconds"]

    def timed(name, function, stage=None):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                key = stage(*args) if stage else name
                seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start
                if name == "sampling":
                    marks["batches"].append(time.perf_counter() - start)
        return wrapper

    def job_run(cfg, *args, **kwargs):
        marks["job_start"] = time.time()
        try:
            return job.sample(cfg, *args, **kwargs)
        finally:
            marks["job_end"] = time.time()

    def npz_stage(path, *_):
        return "shard writes" if os.path.basename(os.path.dirname(path)).endswith("_shards") else "npz write"

    job.load_chosen_weights = timed("checkpoint load", job.load_chosen_weights)
    job.shard_key = timed("shard key (weights digest)", job.shard_key)
    job.sample_batch = timed("sampling", job.sample_batch)
    job.atomic_savez = timed("npz", job.atomic_savez, npz_stage)
    job.merge_shards = timed("merge shards", job.merge_shards)
    job.save_image_grid = timed("grid", job.save_image_grid)
    job.remove_shard_dir = timed("remove shards", job.remove_shard_dir)
    cli.sample = job_run
    sys.argv = [str(REPO / "sample.py"), *overrides]
    try:
        cli.main()
    finally:
        marks["main_end"] = time.time()
        marks["heavy_modules"] = sorted(name for name in HEAVY_MODULES if name in sys.modules)
        Path(marks_path).write_text(json.dumps(marks))


# ------------------------------------------------------------------------------ the parent
class Timing(NamedTuple):
    """Wall-clock seconds, and CPU seconds (user + system, all threads): on a shared
    machine the CPU seconds show the work done, which the other jobs do not stretch."""

    wall: float
    cpu: float


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def sample_overrides(args: argparse.Namespace, out_dir: str) -> list[str]:
    return [f"ckpt={os.path.abspath(args.ckpt)}", f"sampler={args.sampler}", f"num_samples={args.num_samples}",
            f"batch_size={args.batch}", f"device={args.device}", f"seed={args.seed}",
            f"progress={str(args.progress).lower()}", f"hydra.run.dir={out_dir}"]


def child_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    return env


def run_sample_py(args: argparse.Namespace, timeline: bool = False) -> tuple[Timing, dict | None]:
    """(the `Timing` from process start to exit, the timeline's marks or None) of one sample.py run."""
    with tempfile.TemporaryDirectory(prefix="sample_e2e_") as out_dir:
        overrides = sample_overrides(args, os.path.join(out_dir, "run"))
        marks_path = os.path.join(out_dir, "marks.json")
        if timeline:
            command = [sys.executable, __file__, "--timeline", marks_path, "--", *overrides]
        else:
            command = [sys.executable, str(REPO / "sample.py"), *overrides]
        with open(os.path.join(out_dir, "output.log"), "w") as log:
            spawn, start, cpu = time.time(), time.perf_counter(), children_cpu()
            result = subprocess.run(command, cwd=REPO, env=child_env(args), stdout=log, stderr=subprocess.STDOUT)
            seconds = Timing(time.perf_counter() - start, children_cpu() - cpu)
            exit_time = time.time()
        if result.returncode != 0:
            sys.exit(f"sample.py failed (exit {result.returncode}):\n{Path(out_dir, 'output.log').read_text()}")
        expected = f"samples_{args.num_samples}x"
        if not any(name.startswith(expected) and name.endswith(".npz") for name in os.listdir(Path(out_dir, "run"))):
            sys.exit(f"sample.py wrote no {expected}*.npz in {out_dir}/run")
        if not timeline:
            return seconds, None
        marks = json.loads(Path(marks_path).read_text())
        marks.update(spawn=spawn, exit=exit_time)
        return seconds, marks


class BareLoop:
    """The sampler over ``num_samples`` images in batches, the checkpoint loaded once."""

    def __init__(self, args: argparse.Namespace):
        import torch
        from omegaconf import OmegaConf

        from diffusion.checkpoint import load_checkpoint
        from diffusion.jobs.checks import build_sampler
        from diffusion.jobs.common import autocast_network, resolve_devices
        from diffusion.utils.host_memory import retain_freed_memory

        retain_freed_memory()  # as sample.py does: the loop is measured at its best
        self.torch, self.args = torch, args
        self.device = torch.device(resolve_devices(args.device)[0])
        self.loaded = load_checkpoint(args.ckpt, weights="ema")
        self.loaded.model.to(self.device)
        self.sampler = build_sampler(OmegaConf.load(REPO / "configs" / "sampler" / f"{args.sampler}.yaml"))
        self.model = autocast_network(self.loaded.model, self.device, "32")

    def run(self, num_samples: int) -> Timing:
        from diffusion.jobs.common import batch_generator
        from diffusion.jobs.sample import batch_sizes

        torch = self.torch
        start, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for index, size in enumerate(batch_sizes(num_samples, self.args.batch)):
                generator = batch_generator(self.args.seed, index, self.device)
                self.sampler(self.loaded.diffusion, self.model, shape=(size, *self.loaded.image_shape),
                             generator=generator)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return Timing(time.perf_counter() - start, time.process_time() - cpu)


STAGES = [
    "interpreter start-up", "imports", "Hydra: config composition, run folder, logging", "checkpoint load",
    "shard key (weights digest)", "sampling: first batch", "sampling: the other batches", "shard writes",
    "merge shards", "npz write", "grid", "remove shards", "rest of the job (checks, lock, progress, logging)",
    "after the job (Hydra, interpreter exit)",
]


def breakdown(marks: dict) -> dict[str, float]:
    """sample.py's wall time by stage (`STAGES`), from the timeline child's marks."""
    seconds = dict(marks["seconds"])
    batches = marks["batches"]
    stages = {
        "interpreter start-up": marks["child_start"] - marks["spawn"],
        "imports": marks["imported"] - marks["child_start"],
        "Hydra: config composition, run folder, logging": marks["job_start"] - marks["imported"],
        "sampling: first batch": batches[0],
        "sampling: the other batches": sum(batches[1:]),
        "rest of the job (checks, lock, progress, logging)":
            marks["job_end"] - marks["job_start"] - sum(seconds.values()),
        "after the job (Hydra, interpreter exit)": marks["exit"] - marks["job_end"],
    }
    stages.update((name, value) for name, value in seconds.items() if name != "sampling")
    return {name: stages.get(name, 0.0) for name in STAGES}


def beyond_sampling(marks: dict, total: float) -> tuple[float, float]:
    """(seconds outside the sampler's batches, the first batch's excess over the mean of the
    others: the warm-up of a fresh process; 0 with one batch)."""
    batches = marks["batches"]
    excess = batches[0] - statistics.mean(batches[1:]) if len(batches) > 1 else 0.0
    return total - sum(batches), excess


def report_breakdown(args: argparse.Namespace, loop_seconds: float | None) -> float:
    """Print the median stages of ``--breakdown-runs`` stamped runs and the ratio they imply;
    returns the median seconds outside the sampler's batches."""
    runs = [(timing.wall, marks) for timing, marks in
            (run_sample_py(args, timeline=True) for _ in range(args.breakdown_runs))]
    totals = [total for total, _ in runs]
    stages = [breakdown(marks) for _, marks in runs]
    total = statistics.median(totals)
    print(f"\nbreakdown of sample.py, median of {len(runs)} stamped run(s) "
          f"({', '.join(f'{t:.2f}' for t in totals)} s):")
    for name in STAGES:
        seconds = statistics.median(stage[name] for stage in stages)
        print(f"  {name:<52} {seconds:7.2f} s {seconds / total:6.1%}")
    print(f"  imported, not needed: {', '.join(runs[0][1]['heavy_modules']) or 'none of ' + ', '.join(HEAVY_MODULES)}")
    beyond = [beyond_sampling(marks, seconds) for seconds, marks in runs]
    outside, excess = statistics.median(b[0] for b in beyond), statistics.median(b[1] for b in beyond)
    print(f"  outside the sampler's batches {outside:.2f} s; first batch's excess over the others {excess:.2f} s")
    if loop_seconds:
        print(f"  at the loop's median {loop_seconds:.2f} s these give a ratio of "
              f"{loop_seconds / (loop_seconds + outside + excess):.1%}")
    return outside


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a checkpoint of train.py (e.g. the quickstart's last.ckpt)")
    parser.add_argument("--sampler", default="ddim50", help="a configs/sampler/ name")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="alternating pairs (sample.py, loop)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for both (OMP_NUM_THREADS in sample.py); default: as inherited")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="sample.py's progress bar (its default: on; its output goes to a file here)")
    parser.add_argument("--breakdown-runs", type=int, default=1,
                        help="stamped sample.py runs for the breakdown (0: none)")
    parser.add_argument("--no-record", action="store_true")
    return parser.parse_args(argv)


def command_line(argv: list[str]) -> str:
    return " ".join(["python bench/sample_end_to_end.py", *argv])


def measure(args: argparse.Namespace) -> dict | None:
    """Time ``args.repeats`` alternating pairs (sample.py, the loop), print them, and return the
    medians and ratios (None with no repeats), after the breakdown runs."""
    from common import device_name  # imports torch: after OMP_NUM_THREADS is set

    loop = BareLoop(args)
    e2e, bare = [], []
    if args.repeats:
        loop.run(args.batch)  # warm-up: one batch
    for repeat in range(args.repeats):
        e2e.append(run_sample_py(args)[0])
        bare.append(loop.run(args.num_samples))
        print(f"repeat {repeat + 1}: sample.py {e2e[-1].wall:.2f} s ({args.num_samples / e2e[-1].wall:.3g} images/s), "
              f"loop {bare[-1].wall:.2f} s ({args.num_samples / bare[-1].wall:.3g} images/s), "
              f"ratio {bare[-1].wall / e2e[-1].wall:.1%}; CPU seconds {e2e[-1].cpu:.2f} and {bare[-1].cpu:.2f}, "
              f"ratio {bare[-1].cpu / e2e[-1].cpu:.1%}", flush=True)
    result = None
    if args.repeats:
        e2e_wall, loop_wall = (statistics.median(t.wall for t in runs) for runs in (e2e, bare))
        e2e_cpu, loop_cpu = (statistics.median(t.cpu for t in runs) for runs in (e2e, bare))
        pair_ratios = [b.wall / e.wall for e, b in zip(e2e, bare, strict=True)]
        # The ratio is the median of the pairs' own ratios: a drift of the machine's speed
        # (a neighbour on a shared host) moves both runs of a pair, and cancels there.
        result = {"device": device_name(loop.device), "sample_py_images_per_s": args.num_samples / e2e_wall,
                  "loop_images_per_s": args.num_samples / loop_wall, "ratio": statistics.median(pair_ratios),
                  "ratio_of_medians": loop_wall / e2e_wall, "pair_ratios": pair_ratios,
                  "cpu_ratio": loop_cpu / e2e_cpu, "outside_s": None}
        print(f"\n{args.sampler}, {args.num_samples} images at batch {args.batch} on {result['device']}:")
        print(f"  sample.py end to end {result['sample_py_images_per_s']:.3g} images/s (median {e2e_wall:.2f} s, "
              f"{e2e_cpu:.2f} CPU s)")
        print(f"  bare loop            {result['loop_images_per_s']:.3g} images/s (median {loop_wall:.2f} s, "
              f"{loop_cpu:.2f} CPU s)")
        print(f"  ratio {result['ratio']:.1%} (median of the pairs: {', '.join(f'{r:.1%}' for r in pair_ratios)}; "
              f"of the medians {result['ratio_of_medians']:.1%}); in CPU seconds {result['cpu_ratio']:.1%}")
    if args.breakdown_runs:
        outside = report_breakdown(args, loop_wall if args.repeats else None)
        if result:
            result["outside_s"] = outside
    return result


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--timeline":  # the stamped child (see run_timeline_child)
        run_timeline_child(sys.argv[2], sys.argv[4:])
        return
    argv = sys.argv[1:]
    args = parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    result = measure(args)
    if result is None:
        return
    from common import record, stamp

    header = ["date", "commit", "torch", "os", "device", "sampler", "images", "batch", "sample.py images/s",
              "loop images/s", "ratio (median of pairs)", "pair ratios", "CPU-time ratio", "sample.py outside sampling (s)", "command"]
    outside = result["outside_s"]
    row = [*stamp(), result["device"], args.sampler, str(args.num_samples), str(args.batch),
           f"{result['sample_py_images_per_s']:.3g}", f"{result['loop_images_per_s']:.3g}", f"{result['ratio']:.1%}",
           " ".join(f"{r:.1%}" for r in result["pair_ratios"]), f"{result['cpu_ratio']:.1%}",
           "-" if outside is None else f"{outside:.2f}", f"`{command_line(argv)}`"]
    print("\n| " + " | ".join(row) + " |")
    if not args.no_record:
        record("sample.py end to end vs the bare loop (bench/sample_end_to_end.py)", header, row)


if __name__ == "__main__":
    main()
