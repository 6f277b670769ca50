"""The entry points work from any working directory, and from a non-editable install.

train.py / sample.py / evaluate.py and the console scripts diffusion-train / -sample /
-evaluate find their configs and the experiment presets through the package
(``pkg://diffusion.configs``, ``pkg://diffusion.conf``), never through the working directory.
Every run here starts in an empty temporary folder and must leave it empty.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

BIN = Path(sys.executable).parent  # the console scripts sit next to the interpreter
QUICKSTART = ["experiment_name: digits_quickstart", "model_var_type: learned_range", "max_steps: 1200"]
COMMANDS = {
    # --resolve, so that experiment_name shows the preset that was found.
    "train": (["--cfg", "job", "--resolve"], QUICKSTART),
    "sample": (["--help"], ["sample is powered by Hydra", "ddim50", "ckpt: ???"]),
    "evaluate": (["--help"], ["evaluate is powered by Hydra", "ddim50", "metric: nll"]),
    "distill": (["--help"], ["distill is powered by Hydra", "start_steps: 32", "ckpt: ???"]),
    "edit": (["--help"], ["edit is powered by Hydra", "ddim50", "task: reconstruct"]),
}


def run(cmd: list[str], cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def assert_composes(result: subprocess.CompletedProcess, expected: list[str]) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    missing = [line for line in expected if line not in result.stdout]
    assert missing == [], result.stdout + result.stderr


SCRIPTS = [f"{name}.py" for name in COMMANDS] + [  # slow: the same runs through the console scripts
    pytest.param(f"diffusion-{name}", marks=pytest.mark.slow) for name in COMMANDS]


@pytest.mark.parametrize("script", SCRIPTS)
def test_entry_point_from_another_working_directory(script, tmp_path):
    """``cd /elsewhere && python /repo/train.py --cfg job`` finds the quickstart preset (it
    failed with "Could not find 'experiment/digits_quickstart'" when the search path was the
    working directory's conf/), and sample/evaluate print their help."""
    path = REPO / script if script.endswith(".py") else BIN / script
    assert path.is_file(), f"{path} is missing: reinstall the package (make setup)"
    args, expected = COMMANDS[path.stem.removeprefix("diffusion-")]
    assert_composes(run([sys.executable, str(path), *args], cwd=tmp_path), expected)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_run_from_another_working_directory_writes_only_to_its_run_dir(tmp_path):
    """Two training steps from outside the repository: everything lands in hydra.run.dir
    (named after the job: train.log), nothing in the working directory."""
    cwd, out = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    tiny = ["model.model_channels=32", "model.num_res_blocks=1", "diffusion.betas.num_diffusion_timesteps=50",
            "trainer.max_steps=2", "trainer.val_check_interval=1", "trainer.limit_val_batches=1",
            "test_after_fit=false", "~callbacks.sample_grid", "~callbacks.progress_bar"]
    result = run([sys.executable, str(REPO / "train.py"), *tiny, f"hydra.run.dir={out}"], cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert (out / "train.log").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert list(cwd.iterdir()) == []


def install(tmp_path: Path) -> Path:
    """``pip install .`` (not editable, no dependencies, offline) of a copy of the repository,
    into a target folder; the copy keeps the build's files out of the repository."""
    pytest.importorskip("setuptools", reason="the build backend, used without build isolation")
    source, target = tmp_path / "source", tmp_path / "site"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ["src", "configs", "conf"]:  # the folders the package is built from
        shutil.copytree(REPO / name, source / name, ignore=skip)
    for path in REPO.iterdir():  # pyproject.toml, setup.py, README.md, ...
        if path.is_file():
            shutil.copy2(path, source / path.name)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
           "--no-index", "--no-cache-dir", "--target", str(target), str(source)]
    result = run(pip, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    return target


@pytest.mark.slow
def test_a_non_editable_install_finds_its_configs(tmp_path):
    """With ``pip install .`` first on the path, the installed console script and the
    repository's train.py compose the quickstart preset from the installed YAML."""
    site = install(tmp_path)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    where = run([sys.executable, "-c", "import diffusion.conf as c, diffusion.configs as d; print(c.__file__, d.__file__)"],
                cwd=cwd, pythonpath=site)
    assert where.returncode == 0, where.stderr
    assert all(Path(f).is_relative_to(site) for f in where.stdout.split()), where.stdout
    args, expected = COMMANDS["train"]
    for script in [site / "bin" / "diffusion-train", REPO / "train.py"]:
        assert_composes(run([sys.executable, str(script), *args], cwd=cwd, pythonpath=site), expected)
    assert list(cwd.iterdir()) == []
