"""train.py's one error path: a bad config, dataset, file or checkpoint ends as one line,
``error: <what is wrong, naming the key, value or file> <how to fix it>``, exit status 2,
no traceback, and nothing written into the run folder (issue "Reliability, round two").

`SUBPROCESS` cases run train.py itself, all at once (a module fixture starts them in
parallel); `IN_PROCESS` cases go through the same `exit_on_user_error` around `train(cfg)`
in this process, which is cheaper than starting Python again for each.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from diffusion.jobs.errors import exit_on_user_error, user_error
from diffusion.training.config_checks import check_train_config
from diffusion.training.run import train
from diffusion.utils.errors import ConfigError, UserError, config_errors, name_key

from conftest import CONFIGS, EXPERIMENTS, REPO, compose_config
from dataset_files import write_cifar10, write_imagenet64
from test_train import TINY_RUN

# A tiny run that would train for 2 steps if its input were good.
RUN = [*TINY_RUN, "trainer.max_steps=2", "test_after_fit=false", "~callbacks.sample_grid",
       "trainer.limit_val_batches=0", "+trainer.enable_progress_bar=false"]


def write_images(folder: Path, n: int, prefix: str = "") -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        size = (12 + k % 5, 10 + k % 3)  # mixed sizes
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{prefix}{k}.png")


# ------------------------------------------------------------------------ the files
def make_files(root: Path) -> dict[str, str]:
    """Every bad dataset and checkpoint the cases need, under ``root``; their paths by name."""
    paths = {name: str(root / name) for name in ("empty", "no_images", "corrupt", "plain", "cifar", "in64")}
    (root / "empty").mkdir()
    (root / "no_images").mkdir()
    (root / "no_images" / "notes.txt").write_text("not an image")
    write_images(root / "corrupt", 6)
    (root / "corrupt" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    write_images(root / "plain", 6)  # no labels: no sub-folders, no name prefixes
    write_cifar10(root / "cifar")
    batch = root / "cifar" / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:1000])  # truncated
    write_imagenet64(root / "in64")
    np.savez(root / "in64" / "train_data_batch_3.npz", images=np.zeros((6, 12288), np.uint8))
    return paths


def train_once(folder: Path) -> None:
    """A finished 4-step run with a checkpoint, to resume from (in this process: cheaper)."""
    overrides = [*RUN, "trainer.max_steps=4", "callbacks.model_checkpoint.every_n_train_steps=4"]
    try:
        train(compose_config("train", overrides, folder))
    finally:
        GlobalHydra.instance().clear()


def copy_run(source: Path, target: Path, truncate: bool = False) -> None:
    shutil.copytree(source, target)
    if truncate:
        last = target / "checkpoints" / "last.ckpt"
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])


# ------------------------------------------------------------------------ the cases
# name: (overrides, what the error line must contain); {name} is a path from make_files,
# {run} the case's own run folder.
SUBPROCESS = {
    "negative lr": (["module.optimizer.lr=-1"], ["module.optimizer.lr=-1", "positive"]),
    "unknown experiment": (["experiment=nope"], ["experiment/nope", "digits_quickstart"]),
    "class_cond without labels": (["data=image_folder", "data.root={plain}", "class_cond=true"],
                                  ["class_cond=true", "no labels"]),
    "missing folder": (["data=image_folder", "data.root={empty}/missing"], ["{empty}/missing", "data.root"]),
    "empty folder": (["data=image_folder", "data.root={empty}"], ["{empty} holds 0 readable image", "at least 3"]),
    "folder without images": (["data=image_folder", "data.root={no_images}"], ["{no_images} holds 0", ".png"]),
    "corrupt image": (["data=image_folder", "data.root={corrupt}", "data.on_bad_image=raise"],
                      ["{corrupt}/broken.png", "on_bad_image=skip"]),
    "truncated cifar batch": (["data=cifar10", "data.root={cifar}", "data.download=false", "data.num_workers=0"],
                              ["cannot read the CIFAR-10 batches in {cifar}/cifar-10-batches-py"]),
    "imagenet npz without keys": (["data=imagenet64", "data.root={in64}", "data.num_workers=0"],
                                  ["{in64}/train_data_batch_3.npz", "expected keys 'data' and 'labels'"]),
    "ckpt_path=last finds nothing": (["ckpt_path=last"], ["ckpt_path=last", "no last*.ckpt in {run}/checkpoints"]),
    "resume with another model": (["ckpt_path=last", "model.model_channels=64"],
                                  ["model.model_channels=64 (checkpoint: 32)", "config.yaml"]),
    "truncated last.ckpt": (["ckpt_path=last"], ["cannot read checkpoint {run}/checkpoints/last.ckpt", "truncated"]),
}
RESUMES = {"resume with another model": False, "truncated last.ckpt": True}  # copy the trained run; truncate?


def run_case(name: str, paths: dict[str, str], folder: Path) -> tuple[int, str]:
    overrides, _ = SUBPROCESS[name]
    overrides = [o.format(**paths) for o in overrides]
    cmd = [sys.executable, "train.py", *RUN, *overrides, f"hydra.run.dir={folder}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    return result.returncode, result.stderr


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Every `SUBPROCESS` case's (exit status, stderr, run folder, seconds), run 4 at a time."""
    root = tmp_path_factory.mktemp("cases")
    paths = make_files(root)
    trained = root / "trained"
    train_once(trained)
    folders = {name: root / f"run{k}" for k, name in enumerate(SUBPROCESS)}
    for name, truncate in RESUMES.items():
        copy_run(trained, folders[name], truncate)

    def one(name: str):
        started = time.time()
        status, stderr = run_case(name, {**paths, "run": str(folders[name])}, folders[name])
        return name, (status, stderr, time.time() - started)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(pool.map(one, SUBPROCESS))
    return results, paths, folders, trained


def assert_one_line_error(status: int, stderr: str, expected: list[str]) -> None:
    lines = stderr.strip().splitlines()
    assert status == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert lines[-1].startswith("error: "), stderr[-3000:]
    for text in expected:
        assert text in lines[-1], (text, lines[-1])


def assert_nothing_written(folder: Path) -> None:
    """Hydra's own .hydra/ and train.log may be there; nothing of the run's."""
    assert not (folder / "config.yaml").exists()
    assert not (folder / "checkpoints").exists() and not (folder / "csv").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SUBPROCESS))
def test_train_py_reports_bad_input_in_one_line(cli_results, name):
    results, paths, folders, trained = cli_results
    status, stderr, seconds = results[name]
    folder = folders[name]
    expected = [text.format(**paths, run=folder) for text in SUBPROCESS[name][1]]
    assert_one_line_error(status, stderr, expected)
    if name in RESUMES:  # the run folder still describes its own checkpoints
        assert (folder / "config.yaml").read_bytes() == (trained / "config.yaml").read_bytes()
        assert sorted(os.listdir(folder / "checkpoints")) == sorted(os.listdir(trained / "checkpoints"))
    else:
        assert_nothing_written(folder)
    assert seconds < 60


# name: (overrides, what the error line must contain)
IN_PROCESS = {
    "no res blocks": (["model.num_res_blocks=0"], ["model.num_res_blocks=0", ">= 1"]),
    "seed not a number": (["seed=abc"], ["seed=abc", "integer"]),
    "zero max_steps": (["trainer.max_steps=0"], ["trainer.max_steps=0", "integer >= 1"]),
    "max_steps not a number": (["trainer.max_steps=abc"], ["trainer.max_steps=abc"]),
    "zero batch size": (["data.batch_size=0"], ["data.batch_size=0", ">= 1"]),
    "negative val_fraction": (["data.val_fraction=-0.1"], ["data.val_fraction=-0.1", "(0, 1)"]),
    "fractions leave nothing": (["data.val_fraction=0.5", "data.test_fraction=0.5"],
                                ["data.val_fraction=0.5", "less than 1"]),
    "precision typo": (["trainer.precision=32-ture"], ["trainer.precision=32-ture", "bf16-mixed"]),
    "negative gradient clip": (["trainer.gradient_clip_val=-1"], ["trainer.gradient_clip_val=-1", ">= 0"]),
    "ema decay above 1": (["callbacks.ema.decays=[1.5]"], ["callbacks.ema.decays=[1.5]", "[0, 1]"]),
    "dropout above 1": (["model.dropout=1.5"], ["model.dropout=1.5", "[0, 1)"]),
    "unknown variance type": (["diffusion.model_var_type=learnt"], ["diffusion.model_var_type=learnt", "learned_range"]),
    "unknown nonfinite policy": (["module.nonfinite.policy=bogus"], ["module.nonfinite.policy='bogus'", "'skip'"]),
    "attention never reached": (["model.attention_resolutions=[3]"], ["model.attention_resolutions=[3]", "[8, 4]"]),
    "label dropout without labels": (["module.label_dropout=0.5"], ["module.label_dropout=0.5", "class_cond=true"]),
    "zero grad accumulation": (["trainer.accumulate_grad_batches=0"], ["trainer.accumulate_grad_batches=0"]),
    "negative warm-up": (["module.warmup_steps=-1"], ["module.warmup_steps=-1", ">= 0"]),
    "one-step process": (["diffusion.betas.num_diffusion_timesteps=1"],
                         ["diffusion.betas.num_diffusion_timesteps=1", ">= 2"]),
    "unknown model key": (["+model.foo=1"], ["model:", "'foo'"]),
    "unknown trainer key": (["+trainer.foo=1"], ["trainer:", "'foo'"]),
    "GroupNorm width": (["model.model_channels=48"], ["model.model_channels=48", "divisible by 32"]),
    "more DDIM steps than T": (["+callbacks.sample_grid._target_=diffusion.training.callbacks.SampleGrid",
                                "+callbacks.sample_grid.ddim_steps=60"], ["callbacks.sample_grid.ddim_steps=60", "T=50"]),
    "negative logging interval": (["trainer.log_every_n_steps=-5"], ["trainer.log_every_n_steps=-5", ">= 0"]),
    "negative weight decay": (["module.optimizer.weight_decay=-0.1"], ["module.optimizer.weight_decay=-0.1"]),
    "unknown matmul precision": (["matmul_precision=fast"], ["matmul_precision=fast", "high"]),
    "unknown compile mode": (["model.compile=true", "model.compile_mode=fastest"],
                             ["model.compile_mode=fastest", "reduce-overhead"]),
    "compile mode without compile": (["model.compile_mode=max-autotune"],
                                     ["model.compile_mode=max-autotune", "model.compile=true"]),
    "unknown schedule sampler": (["module.schedule_sampler=importance"], ["module:", "uniform"]),
    "unknown optimizer key": (["+module.optimizer.foo=1"], ["module.optimizer:", "'foo'"]),
    "unknown schedule": (["diffusion/schedule=linear", "diffusion.betas.schedule_name=quadratic"],
                         ["diffusion:", "quadratic"]),
}


@pytest.mark.parametrize("name", sorted(IN_PROCESS))
def test_bad_config_fails_early_through_the_error_path(compose_cfg, tmp_path, capsys, name):
    overrides, expected = IN_PROCESS[name]
    started = time.time()
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        train(compose_cfg("train", [*RUN, *overrides]))
    assert_one_line_error(exit_info.value.code, capsys.readouterr().err, expected)
    assert_nothing_written(tmp_path / "run")
    assert time.time() - started < 10


GROUP_CHOICES = [[f"{group}={path.stem}"] for group in ("data", "trainer")
                 for path in sorted((CONFIGS / group).glob("*.yaml")) if path.stem != "default"]


@pytest.mark.parametrize("overrides", [[f"experiment={e}"] for e in EXPERIMENTS] + GROUP_CHOICES, ids=str)
def test_every_preset_and_group_passes_the_checks(compose_cfg, overrides):
    check_train_config(compose_cfg("train", overrides))


def test_ckpt_path_last_or_new_resumes_when_it_can_and_starts_when_it_cannot(tmp_path):
    from omegaconf import OmegaConf

    from diffusion.training.preflight import find_resume_checkpoint
    cfg = OmegaConf.create({"ckpt_path": "last_or_new", "output_dir": str(tmp_path)})
    assert find_resume_checkpoint(cfg) is None  # nothing yet: a new run
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert find_resume_checkpoint(cfg) == str(tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(UserError, match=f"ckpt_path=last, but there is no last.*ckpt in {tmp_path}/elsewhere"):
        find_resume_checkpoint(OmegaConf.create({"ckpt_path": "last", "output_dir": str(tmp_path / "elsewhere")}))


# ------------------------------------------------------------------------ the error path
def test_bugs_keep_their_traceback():
    with pytest.raises(KeyError), exit_on_user_error():
        raise KeyError("a bug")
    with pytest.raises(ValueError), exit_on_user_error():  # a ValueError is not a user error by itself
        raise ValueError("deep inside a library")
    with pytest.raises(ZeroDivisionError), config_errors("model"):  # nor inside a config group
        raise ZeroDivisionError


def test_a_constructor_check_names_its_config_group():
    with pytest.raises(ConfigError, match=r"^model\.num_heads=3 must"), config_errors("model"):
        from diffusion.utils.checks import require_int
        require_int("num_heads", 3, 4)
    assert name_key("module", "module.nonfinite.policy='x' ...") == "module.nonfinite.policy='x' ..."
    assert name_key("data", "cannot read a file") == "data: cannot read a file"


def test_disk_full_and_permission_errors_are_the_users():

    full = OSError(errno.ENOSPC, "No space left on device")
    wrapped = OSError("writing checkpoint /r/last.ckpt failed; the previous file is intact")
    wrapped.__cause__ = full
    message = user_error(wrapped)
    assert message.startswith("writing checkpoint /r/last.ckpt failed") and "disk is full" in message
    assert "Permission denied" in user_error(PermissionError(errno.EACCES, "Permission denied", "/r/x"))
    assert user_error(OSError(errno.EIO, "Input/output error")) is None  # hardware: show the traceback
    try:  # a bug while handling a missing file is still a bug
        try:
            open("/nonexistent/file")
        except FileNotFoundError:
            {}["key"]
    except KeyError as bug:
        assert user_error(bug) is None


def test_hydra_full_error_shows_the_traceback(tmp_path):
    cmd = [sys.executable, "train.py", *RUN, "module.optimizer.lr=-1", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr
    assert "ConfigError: module.optimizer.lr=-1" in result.stderr


@pytest.mark.slow
def test_an_image_folder_trains_with_the_defaults(compose_cfg, tmp_path):
    """python train.py data=image_folder data.root=DIR: 20 RGB images of mixed sizes, no other
    setting but a short run (the default UNet puts attention where a 64-pixel image has it)."""
    write_images(tmp_path / "images", 20)
    cfg = compose_cfg("train", ["data=image_folder", f"data.root={tmp_path / 'images'}", "trainer.max_steps=2",
                                "test_after_fit=false", "callbacks.sample_grid.num_samples=1",
                                "callbacks.sample_grid.ddim_steps=2"])
    with pytest.warns(UserWarning, match="training batches will hold 18"):  # 1 val, 1 test, 18 train
        train(cfg)
    from diffusion.checkpoint import load_checkpoint

    loaded = load_checkpoint(str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    assert loaded.global_step == 2 and loaded.image_shape == (3, 64, 64)
    assert loaded.config["model"]["attention_resolutions"] is None  # null: follows the image size
    assert loaded.model.attention_resolutions == (16, 8) and loaded.model.channel_mult == (1, 2, 3, 4)
