"""The summary of an evaluate.py sweep: every job's score side by side, and the best one.

    python evaluate.py -m ckpt=.../last.ckpt metric=fid ema_std=0.03,0.05,0.08,0.1,0.15

Hydra runs one evaluate job per value, each writing ``<sweep dir>/<job>/<metric>.json``.
When the sweep ends, `SweepSummary` (a Hydra callback that evaluate.yaml installs) reads those
files, prints the jobs best first with their overrides, and writes ``<sweep dir>/summary.json``.
A job's score is the first of its metric's `SCORES` entries in its results (lower is better):
``bpd`` for ``metric=nll``, ``fid`` or, on the digits, ``fid_digits`` (``fd_dinov2`` with
``feature_extractor=dinov2``) for ``metric=fid``; with ``num_seeds`` > 1, its mean over the seeds.
Any sweep of evaluate.py is summarised this way (EMA widths, weights, sampler steps, ...).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from diffusion.jobs.evaluate import SCORES
from diffusion.utils.atomic import atomic_save_json

SUMMARY = "summary.json"


def score(results: dict[str, Any]) -> tuple[str, float] | None:
    """(the name, the value) of a job's score, or None when its results have none."""
    for key in SCORES.get(results.get("metric"), ()):
        if isinstance(results.get(key), (int, float)):
            return key, float(results[key])
    return None


def read_jobs(folder: str) -> list[dict[str, Any]]:
    """Every scored job under a sweep folder: its folder, overrides, metric, score, weights."""
    jobs = []
    for metric in SCORES:
        for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*", f"{metric}.json"))):
            with open(path) as handle:
                results = json.load(handle)
            scored = score(results)
            if scored is None:
                continue
            job_dir = os.path.dirname(path)
            overrides_file = os.path.join(job_dir, ".hydra", "overrides.yaml")
            overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) if os.path.isfile(overrides_file) else None
            jobs.append({"dir": job_dir, "overrides": overrides, "metric": metric, "score_name": scored[0],
                         "score": scored[1], "weights": results.get("weights"), "ema_std": results.get("ema_std")})
    return jobs


def summarize(folder: str) -> dict[str, Any]:
    """Write ``<folder>/summary.json``: per metric, the jobs best first and the best one;
    print them. Returns the summary (empty when no job finished)."""
    summary: dict[str, Any] = {}
    for job in read_jobs(folder):
        summary.setdefault(job["metric"], {"jobs": []})["jobs"].append(job)
    for metric, entry in summary.items():
        entry["jobs"].sort(key=lambda job: job["score"])
        entry["best"] = entry["jobs"][0]
        # The overrides that every job shares (ckpt=, metric=, ...) say nothing about the ranking.
        shared = set.intersection(*(set(job["overrides"] or ()) for job in entry["jobs"]))
        print(f"{metric}: {len(entry['jobs'])} job(s), best first (lower {entry['best']['score_name']} is better)")
        for job in entry["jobs"]:
            swept = [o for o in job["overrides"] or () if o not in shared] or [f"weights={job['weights']}"]
            print(f"  {job['score_name']} {job['score']:.4f}  {' '.join(swept)}  ({job['dir']})")
    if summary:
        atomic_save_json(os.path.join(folder, SUMMARY), summary)
        print(f"wrote {os.path.join(folder, SUMMARY)}")
    return summary


class SweepSummary(Callback):
    """Hydra callback: `summarize` the sweep folder once every job of a multirun is done."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summarize(str(config.hydra.sweep.dir))
