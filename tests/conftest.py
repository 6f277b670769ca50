"""Shared fixtures: composing the Hydra configs the way the entry points do."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import diffusion  # noqa: F401  (first: makes torchvision importable on CPU-only torch)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))

# Overrides that shrink any preset's UNet to a few thousand parameters.
TINY_UNET = [
    "model.model_channels=32",
    "model.num_res_blocks=1",
    "model.channel_mult=[1,2]",
    "model.num_heads=2",
    "model.dropout=0.0",
]


def quiet_trainer(tmp_path, callbacks, max_steps, **kwargs):
    """A CPU Trainer for callback tests: no logger, progress bar, summary, checkpoints or
    validation unless ``kwargs`` ask for them."""
    import lightning as L  # after diffusion (above), which makes torchvision importable

    defaults = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                    default_root_dir=tmp_path, limit_val_batches=0, num_sanity_val_steps=0)
    return L.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


def compose_config(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose ``configs/<config_name>.yaml`` as @hydra.main would, minus the hydra node."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name, overrides=[*overrides, f"output_dir={output_dir}"],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def train_checkpoint(out: Path, overrides: list[str]) -> str:
    """Train the composed ``train`` config with ``overrides`` into ``out`` (also the working
    directory meanwhile); returns the path of its last.ckpt."""
    from diffusion.training.run import train  # noqa: PLC0415  (Lightning only where a test trains)

    cwd = os.getcwd()
    os.chdir(out)
    try:
        train(compose_config("train", overrides, out))
    finally:
        os.chdir(cwd)
    return str(out / "checkpoints" / "last.ckpt")


@pytest.fixture
def compose_cfg(tmp_path, monkeypatch):
    """``compose_cfg("train", [...])``: a composed config writing under tmp_path/run."""
    monkeypatch.chdir(tmp_path)  # the configs come with the package: any working directory works

    def _compose(config_name: str, overrides: list[str] | None = None, output_dir: Path | None = None):
        return compose_config(config_name, list(overrides or []), output_dir or tmp_path / "run")

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A checkpoint of a 4-step run of a tiny UNet on the digits (T = 50, cosine), trained
    once per test session for every job test that only reads it."""
    from test_train import TINY_RUN  # noqa: PLC0415  (test_train imports this module)

    return train_checkpoint(tmp_path_factory.mktemp("tiny_run"), [
        *TINY_RUN, "trainer.max_steps=4", "test_after_fit=false", "trainer.limit_val_batches=0",
        "~callbacks.sample_grid"])



@pytest.fixture(scope="session")
def tiny_cond_ckpt(tmp_path_factory):
    """A class-conditional ``tiny_ckpt`` trained with label dropout (a null class, for
    guidance): 6 steps at a learning rate high enough, and an EMA short enough, that the
    class changes the weights' outputs."""
    from test_train import TINY_RUN  # noqa: PLC0415  (test_train imports this module)

    return train_checkpoint(tmp_path_factory.mktemp("tiny_cond_run"), [
        *TINY_RUN, "class_cond=true", "module.label_dropout=0.2", "module.warmup_steps=0",
        "module.optimizer.lr=3e-3", "callbacks.ema.decays=[0.5]", "trainer.max_steps=6", "test_after_fit=false",
        "trainer.limit_val_batches=0", "~callbacks.sample_grid", "~callbacks.posthoc_ema"])


@pytest.fixture(scope="session")
def tiny_superres_ckpt(tmp_path_factory):
    """A 3-step run of a tiny super-resolution UNet, digits 4x4 -> 8x8 (T = 20)."""
    return train_checkpoint(tmp_path_factory.mktemp("tiny_superres_run"), [
        "experiment=digits_superres_4to8", *TINY_UNET, "model.attention_resolutions=[4]",
        "diffusion.betas.num_diffusion_timesteps=20", "data.batch_size=16", "~callbacks.progress_bar",
        "trainer.max_steps=3", "test_after_fit=false", "trainer.limit_val_batches=0", "~callbacks.posthoc_ema",
        "trainer.log_every_n_steps=1"])
