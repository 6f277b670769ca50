"""Helpers shared by the benchmarks: composing a preset, naming the device, recording rows."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import diffusion  # noqa: F401  (first: makes torchvision importable on CPU-only torch)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results.md"


def compose_preset(experiment: str, overrides: list[str], output_dir: str) -> DictConfig:
    os.chdir(REPO)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", f"output_dir={output_dir}", *overrides],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record(table: str, header: list[str], row: list[str]) -> None:
    """Append ``row`` to the table titled ``table`` in bench/results.md (created on first use)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\nRows are appended by the scripts in bench/; each names its device, date and commit.\n"
    title = f"## {table}"
    line = "| " + " | ".join(row) + " |"
    if title not in text:
        text = text.rstrip() + f"\n\n{title}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n"
        text += line + "\n"
    else:
        head, _, tail = text.partition(title)
        block, sep, rest = tail.partition("\n## ")
        text = head + title + block.rstrip("\n") + "\n" + line + "\n" + ("\n## " + rest if sep else "")
    RESULTS.write_text(text)


def stamp() -> list[str]:
    return [datetime.date.today().isoformat(), commit(), f"torch {torch.__version__}", sys.platform]
