"""Every preset composes, and its parts instantiate into the objects they name."""

from __future__ import annotations

import hydra
import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException

from diffusion.checkpoint import split_model_config
from diffusion.process.gaussian_diffusion import GaussianDiffusion

from conftest import EXPERIMENTS, REPO, TINY_UNET

EXPECTED = {
    "digits_quickstart": dict(
        steps=1000, var="learned_range", loss="rescaled_mse", data="DigitsData"
    ),
    "cifar_cosine_learned_sigma": dict(
        steps=4000, var="learned_range", loss="rescaled_mse", data="Cifar10Data"
    ),
    "cifar_linear_ddpm": dict(steps=1000, var="fixed_large", loss="mse", data="Cifar10Data"),
    "cifar_cosine_vlb": dict(
        steps=4000, var="learned_range", loss="rescaled_kl", data="Cifar10Data"
    ),
    "imagenet64_cosine_hybrid": dict(
        steps=4000, var="learned_range", loss="rescaled_mse", data="ImageNet64Data"
    ),
    "celeba64_cosine_hybrid": dict(
        steps=4000, var="learned_range", loss="rescaled_mse", data="CelebAData"
    ),
    "cifar_cosine_v_minsnr": dict(
        steps=1000, var="fixed_large", loss="mse", data="Cifar10Data"
    ),
    "cifar_cond_cfg": dict(
        steps=4000, var="learned_range", loss="rescaled_mse", data="Cifar10Data"
    ),
}


def test_every_preset_is_checked():
    assert set(EXPERIMENTS) >= set(EXPECTED), set(EXPECTED) - set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", sorted(EXPECTED))
def test_preset_composes_and_instantiates(compose_cfg, experiment):
    cfg = compose_cfg("train", [f"experiment={experiment}"])
    want = EXPECTED[experiment]
    process = hydra.utils.instantiate(cfg.diffusion)
    assert isinstance(process, GaussianDiffusion)
    assert process.num_timesteps == want["steps"]
    assert process.model_var_type.value == want["var"]
    assert process.loss_type.value == want["loss"]
    assert cfg.data._target_.endswith(want["data"])
    image_size = {"digits": 8, "cifar": 32}.get(experiment.split("_")[0], 64)
    unet_cfg, runtime = split_model_config(cfg.model)
    assert set(runtime) == {"channels_last", "compile"} and runtime["compile"] is False  # compile_mode null: absent
    unet = hydra.utils.instantiate(unet_cfg)(
        image_size=image_size, in_channels=3, out_channels=3, num_classes=None
    )
    assert sum(p.numel() for p in unet.parameters()) > 1e5


def test_iddpm_cifar_recipe_values(compose_cfg):
    cfg = compose_cfg("train", ["experiment=cifar_cosine_learned_sigma"])
    assert cfg.model.model_channels == 128 and cfg.model.num_res_blocks == 3
    assert cfg.model.dropout == 0.3 and list(cfg.model.attention_resolutions) == [16, 8]
    assert cfg.model.num_heads == 4 and cfg.data.batch_size == 128
    assert cfg.module.optimizer.lr == 1e-4 and cfg.diffusion.betas.schedule_name == "cosine"


def test_vlb_preset_uses_loss_aware_sampling(compose_cfg):
    cfg = compose_cfg("train", ["experiment=cifar_cosine_vlb"])
    assert cfg.module.schedule_sampler == "loss-second-moment"


def test_default_is_the_quickstart(compose_cfg):
    cfg = compose_cfg("train", [])
    assert cfg.experiment_name == "digits_quickstart"
    assert cfg.data._target_.endswith("DigitsData")


def test_schedule_group_override(compose_cfg):
    cfg = compose_cfg("train", ["diffusion/schedule=linear"])
    assert cfg.diffusion.betas.schedule_name == "linear"


def test_unknown_group_choice_lists_the_choices(compose_cfg):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("train", ["experiment=no_such_preset"])
    assert "no_such_preset" in str(err.value) and "cifar_cosine_learned_sigma" in str(err.value)


@pytest.mark.parametrize("logger, cls", [("csv", "ResumableCSVLogger"), ("tensorboard", "TensorBoardLogger"),
                                         ("wandb", "WandbLogger")])
def test_loggers_instantiate(compose_cfg, logger, cls, tmp_path):
    cfg = compose_cfg("train", [f"logger={logger}"])
    instances = [hydra.utils.instantiate(node) for node in cfg.logger.values()]
    assert [type(i).__name__ for i in instances] == [cls]
    assert instances[0].save_dir == str(tmp_path / "run")  # under the run's output folder


def test_slurm_launcher_config_composes(compose_cfg):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_cfg("train", ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4"])
    assert cfg.trainer.strategy == "ddp"
    launcher = HydraConfig.get().launcher  # the hydra node that compose returned
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == 4 and launcher.gpus_per_node == 4


def test_tiny_unet_overrides_compose(compose_cfg):
    cfg = compose_cfg("train", TINY_UNET)
    assert cfg.model.model_channels == 32


def test_help_names_every_preset():
    """`python train.py --help` lists the presets; keep it true when one is added."""
    header = (REPO / "configs" / "train.yaml").read_text()
    missing = [name for name in EXPERIMENTS if name not in header]
    assert not missing, f"add {missing} to hydra.help.header in configs/train.yaml"
