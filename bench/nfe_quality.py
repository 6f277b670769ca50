"""Sample quality against the number of model evaluations (NFE) for DDIM, the multistep
solvers (DPM-Solver++(2M) and (3M), UniPC), EDM's Heun sampler and distilled students, on a
quickstart (digits) checkpoint.

Every sampler draws the same N samples' starting noise (batch i from the generator seeded
with (seed, i), as sample.py does) and is scored with the metric evaluate.py reports for
the digits: fid_digits, the Fréchet distance in the features of a small digits classifier
(diffusion.evaluation.fid; NOT comparable to Inception FID), against the train split. The
real held-out digits, the validation and test parts of the one digits split together (360
images, diffusion.data.digits), scored the same way give the floor that N samples can reach.

    python bench/nfe_quality.py --ckpt outputs/.../checkpoints/last.ckpt
    python bench/nfe_quality.py --ckpt last.ckpt --num-samples 400 --nfe 5 10 --families ddim,unipc
    python bench/nfe_quality.py --ckpt last.ckpt --families "" --append \
        --student "progressive distillation=outputs/distill/<run>/round_0004/student.ckpt"

Families (--families): ddim (DDIM η 0 on its "ddimN" steps, the preset), ddim_trailing,
dpmpp2m, dpmpp3m, unipc (UniPC-2 with corrector), unipc3, unipc_low (UniPC-2 from σ_max = 10),
heun (N levels, 2N − 1 NFE); the σ solvers on the default grid (Karras ρ = 7 from σ_max = 80).

Writes bench/nfe_quality.csv (one row per sampler and NFE, and one for the real held-out
digits) and docs/nfe_quality.png; ``--plot-only`` redraws the plot from the CSV.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import hydra
import matplotlib
import torch

import diffusion  # noqa: F401  (first: makes torchvision importable on CPU-only torch)
from diffusion.checkpoint import load_checkpoint
from diffusion.data.digits import digits_images
from diffusion.evaluation import DigitsFeatureExtractor, FIDEvaluator
from diffusion.evaluation.fid import DEFAULT_CACHE_DIR, to_uint8_nchw
from diffusion.jobs.common import autocast_network, batch_generator
from diffusion.sampling import (
    DDIMSampler,
    DPMSolverPP2MSampler,
    DPMSolverPP3MSampler,
    HeunSampler,
    UniPCSampler,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIELDS = ["family", "sampler", "schedule", "steps", "nfe", "num_samples", "fid_digits",
          "classifier_score", "seconds", "ckpt", "global_step"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=None, help="a quickstart checkpoint (required)")
    parser.add_argument("--weights", default="ema", help="ema (first rate), raw, or a rate like 0.999")
    parser.add_argument("--num-samples", type=int, default=1000,
                        help="samples per sampler; the real floor scores the first N of the 360 "
                             "held-out digits (val + test)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32", choices=["32", "bf16", "16"])
    parser.add_argument("--nfe", type=int, nargs="+", default=[1, 2, 3, 5, 10, 20, 50, 100],
                        help="model evaluations per sample (Heun: the nearest odd count 2N − 1 ≤ NFE)")
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help=f"comma-separated, from: {', '.join(FAMILIES)}")
    parser.add_argument("--student", action="append", default=[], metavar="LABEL=CKPT",
                        help="a distilled checkpoint (distill.py), sampled with its own sampler; students "
                             "with the same LABEL form one line (repeatable)")
    parser.add_argument("--append", action="store_true",
                        help="keep the CSV's other rows (a row of the same family and NFE is replaced)")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
    parser.add_argument("--csv", default=str(REPO / "bench" / "nfe_quality.csv"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "nfe_quality.png"))
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the CSV")
    args = parser.parse_args(argv)
    if args.ckpt is None and not args.plot_only:
        parser.error("--ckpt is required: a checkpoint of the digits quickstart (python train.py)")
    return args


FAMILIES = {
    "ddim": ("DDIM (eta 0), ddimN steps", lambda n: DDIMSampler(steps=n)),
    "ddim_trailing": ("DDIM (eta 0), trailing steps", lambda n: DDIMSampler(steps=n, skip="trailing")),
    "dpmpp2m": ("DPM-Solver++(2M)", lambda n: DPMSolverPP2MSampler(steps=n)),
    "dpmpp3m": ("DPM-Solver++(3M)", lambda n: DPMSolverPP3MSampler(steps=n)),
    "unipc": ("UniPC-2", lambda n: UniPCSampler(steps=n)),
    "unipc3": ("UniPC-3", lambda n: UniPCSampler(steps=n, order=3)),
    "unipc_low": ("UniPC-2, sigma_max 10", lambda n: UniPCSampler(steps=n, sigma_max=10.0)),
    "heun": ("Heun (EDM)", lambda n: HeunSampler(steps=(n + 1) // 2)),
}


def sampler_grid(args) -> list[tuple[str, object]]:
    """(family label, sampler) for every point of the plot."""
    families = [f for f in args.families.split(",") if f]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"--families: unknown {', '.join(unknown)}; valid: {', '.join(FAMILIES)}")
    grid = []
    for family in families:
        label, make = FAMILIES[family]
        nfes = sorted({n if family != "heun" else 2 * ((n + 1) // 2) - 1 for n in args.nfe})
        grid += [(label, make(n)) for n in nfes]
    return grid


def draw(loaded, sampler, args, device) -> torch.Tensor:
    """N samples in [-1, 1], batch i seeded with (seed, i)."""
    model = autocast_network(loaded.model, device, args.precision)
    batches, done = [], 0
    for index in range((args.num_samples + args.batch_size - 1) // args.batch_size):
        size = min(args.batch_size, args.num_samples - done)
        generator = batch_generator(args.seed, index, device)
        with torch.inference_mode():
            batches.append(sampler(loaded.diffusion, model, shape=(size, *loaded.image_shape),
                                   generator=generator).cpu())
        done += size
    return torch.cat(batches)


def plot(rows, path) -> None:
    """log-log fid_digits against NFE, one line per sampler family, the real data dashed."""
    samplers = [r for r in rows if r["sampler"] != "data"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for family in dict.fromkeys(r["family"] for r in samplers):
        points = sorted((int(r["nfe"]), float(r["fid_digits"])) for r in samplers if r["family"] == family)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=family)
    for r in rows:
        if r["sampler"] == "data":
            ax.axhline(float(r["fid_digits"]), color="gray", linestyle="--", linewidth=1,
                       label=f"{r['family']} ({float(r['fid_digits']):.2f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = []
    for nfe in sorted({int(r["nfe"]) for r in samplers}):
        if ticks and nfe <= 1.2 * ticks[-1]:  # 19 and 20 would overlap: keep 20
            ticks.pop()
        ticks.append(nfe)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 10, not 10^1
    ax.yaxis.set_minor_formatter(  # label 2, 3, 5 x 10^k only
        FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "235" else "")
    )
    ax.set_xlabel("model evaluations (NFE)")
    ax.set_ylabel("fid_digits (log scale; lower is better)")
    first = samplers[0]
    where = "/".join(Path(first["ckpt"]).parts[-3:])
    ax.set_title(f"{where} (step {first['global_step']}), N = {first['num_samples']} samples", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def scorer(args, device):
    """images -> the evaluate.py digits metrics (fid_digits, classifier_score, ...)."""
    evaluator = FIDEvaluator(DigitsFeatureExtractor.load_or_fit(args.cache_dir),
                             cache_dir=args.cache_dir, device=device)

    def score(images):
        return evaluator(to_uint8_nchw(images), dataset="digits", split="train",
                         real_batches=lambda: [digits_images("train")])

    return score


def held_out_digits() -> torch.Tensor:
    """The real digits no model trained on: the validation and test parts of the one split
    (uint8, 180 + 180 images)."""
    return torch.cat([digits_images("val")[0], digits_images("test")[0]])


def students(args, device) -> list[tuple[str, object, object, str]]:
    """(label, sampler, checkpoint, path) for each --student LABEL=CKPT: the sampler its
    checkpoint names (``sample.py sampler=student``)."""
    found = []
    for spec in args.student:
        label, _, path = spec.partition("=")
        loaded = load_checkpoint(path, weights=args.weights)
        if not (loaded.distilled or {}).get("sampler"):
            raise SystemExit(f"--student {spec}: {path} is not a student of distill.py (it names no sampler)")
        loaded.model.to(device).eval()
        found.append((label, hydra.utils.instantiate(loaded.distilled["sampler"]), loaded, path))
    return found


def measure(args, loaded, score, device) -> list[dict]:
    """One CSV row per sampler of the grid, and one for up to N real held-out digits (the floor)."""
    rows = []
    real_images = held_out_digits()[: args.num_samples]
    real = score(real_images)
    floor = f"real held-out digits (val + test), N = {len(real_images)}"
    points = [(family, sampler, loaded, str(args.ckpt)) for family, sampler in sampler_grid(args)]
    for family, sampler, model, path in [*points, *students(args, device), (floor, None, loaded, str(args.ckpt))]:
        if sampler is None:
            result, seconds, nfe, steps, schedule, name = real, 0.0, 0, "", "", "data"
        else:
            sampler.check(model.diffusion)
            start = time.perf_counter()
            samples = draw(model, sampler, args, device)
            seconds = time.perf_counter() - start
            result = score(samples)
            nfe = sampler.num_function_evals(loaded.diffusion.num_timesteps)
            steps = sampler.steps if sampler.steps is not None else sampler.respacing
            schedule = getattr(sampler, "schedule", None) or f"skip={getattr(sampler, 'skip', '')}"
            name = type(sampler).__name__
        rows.append({
            "family": family, "sampler": name, "schedule": schedule, "steps": steps, "nfe": nfe,
            "num_samples": args.num_samples, "fid_digits": result["fid_digits"],
            "classifier_score": result["classifier_score"], "seconds": round(seconds, 1),
            "ckpt": path, "global_step": model.global_step,
        })
        print(f"{family:42s} NFE {nfe:4d}: fid_digits {result['fid_digits']:8.3f}  "
              f"classifier score {result['classifier_score']:.3f}  ({seconds:.0f} s)", flush=True)
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.plot_only:
        with open(args.csv, newline="") as handle:
            plot(list(csv.DictReader(handle)), args.plot)
        print(f"wrote {args.plot}")
        return
    device = torch.device(args.device)
    loaded = load_checkpoint(args.ckpt, weights=args.weights)
    loaded.model.to(device).eval()
    rows = measure(args, loaded, scorer(args, device), device)
    if args.append and Path(args.csv).exists():
        with open(args.csv, newline="") as handle:
            measured = {(r["family"], str(r["nfe"])) for r in rows}
            rows = [r for r in csv.DictReader(handle) if (r["family"], r["nfe"]) not in measured] + rows
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.plot)
    print("\n| sampler | NFE | fid_digits | classifier score |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['family']} | {row['nfe']} | {float(row['fid_digits']):.2f} | "
              f"{float(row['classifier_score']):.2f} |")
    print(f"wrote {args.csv} and {args.plot}")


if __name__ == "__main__":
    main()
