"""The final summary of bench/gpu_check.sh: every stage's outcome, the test counts and the
figures, from what the stages left in OUTDIR (stages.tsv, pytest_gpu.xml, train_bf16.json,
train_bf16_compile.json). Prints it, writes OUTDIR/summary.md and OUTDIR/summary.json, and
exits 0 only when every stage passed.

    python bench/gpu_check_summary.py OUTDIR
"""

from __future__ import annotations

import csv
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

TIMED_OUT = {"124", "137"}  # timeout's status, and SIGKILL's after --kill-after


def stages(out: Path) -> list[dict]:
    if not (out / "stages.tsv").exists():
        return []
    rows = list(csv.DictReader(open(out / "stages.tsv"), delimiter="\t"))
    for row in rows:
        status = row["status"]
        row["outcome"] = ("passed" if status == "0" else "timed out" if status in TIMED_OUT
                          else status if status == "not run" else f"failed ({status})")
    return rows


def tests(out: Path) -> dict | None:
    """Counts from pytest's JUnit XML, and the names of the tests that failed."""
    path = out / "pytest_gpu.xml"
    if not path.exists():
        return None
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed}


def figures(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    if not path.exists():
        return None
    (report,) = json.loads(path.read_text())
    return report


def gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def training_line(label: str, report: dict) -> str:
    t = report["train"]
    return (f"| {label} | {t['batch']} | {t['images_per_s']:.4g} | {t['achieved_flops_per_s'] / 1e12:.3g} | "
            f"{t['mfu_vs_conv']:.1%} | {t['mfu_vs_matmul']:.1%} | {t['share_outside']:.1%} | "
            f"{gib(t['peak_memory'])} |")


def summarize(out: Path) -> tuple[str, dict]:
    rows, results = stages(out), tests(out)
    eager, compiled = figures(out, "train_bf16"), figures(out, "train_bf16_compile")
    lines = ["# GPU check summary", ""]
    reference = eager or compiled
    if reference:
        lines += [f"Device: {reference['device']}, torch {reference['torch']}.", ""]
    lines += ["| stage | outcome | seconds |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {r['outcome']} | {r['seconds']} |" for r in rows]
    if results:
        lines += ["", f"Tests (`pytest -m gpu`): {results['passed']} passed, {results['failures']} failed, "
                      f"{results['errors']} errors, {results['skipped']} skipped."]
        lines += [f"- failed: {name}" for name in results["failed"]]
    if reference:
        lines += ["", f"Peaks measured in each run (bf16): conv 3x3 {reference['conv_peak']['flops_per_s'] / 1e12:.3g} "
                      f"TFLOP/s ({reference['conv_peak']['what']}), matmul "
                      f"{reference['matmul_peak']['flops_per_s'] / 1e12:.3g} TFLOP/s ({reference['matmul_peak']['what']}); "
                      f"the UNet costs {reference['train']['flops_per_image'] / 1e9:.4g} GFLOP per image and step.",
                  "", "| training, CIFAR preset, synthetic data | batch | images/s | TFLOP/s | MFU vs conv | "
                      "MFU vs matmul | step outside the UNet | peak memory |", "|---|---|---|---|---|---|---|---|"]
        if eager:
            lines.append(training_line("bf16", eager))
        if compiled:
            lines.append(training_line("bf16 + torch.compile", compiled))
        if eager and compiled:
            speedup = compiled["train"]["images_per_s"] / eager["train"]["images_per_s"]
            lines += ["", f"torch.compile: x{speedup:.3f} the eager images/s."]
        for label, report in (("eager", eager), ("torch.compile", compiled)):
            if report and report.get("sampling"):
                s = report["sampling"]
                lines += ["", f"Sampling ({label}): {report['sampler']} ({s['model_evaluations']} evaluations), "
                              f"batch {s['batch']}, precision {s['precision']}: {s['images_per_s']:.4g} images/s."]
    if (out / "results.md").exists():
        lines += ["", f"Rows for bench/results.md: {out / 'results.md'}"]
    ok = bool(rows) and all(r["status"] == "0" for r in rows)
    lines += ["", "All stages passed." if ok else "Some stages did not pass: see gpu_check.log."]
    data = {"ok": ok, "stages": rows, "tests": results, "train_bf16": eager, "train_bf16_compile": compiled}
    return "\n".join(lines) + "\n", data


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    text, data = summarize(out)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(data, indent=1) + "\n")
    print(text, end="")
    return 0 if data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
