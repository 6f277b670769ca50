"""Super-resolution (IDDPM App. A; improved-diffusion's SuperResModel): the conditioned UNet
at every preset's size, the low-resolution pairs, a tiny training run sampled end to end,
and sample.py's one-line errors."""

from __future__ import annotations

import hydra
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from diffusion.checkpoint import load_checkpoint
from diffusion.data import DigitsData, SuperResData
from diffusion.jobs.sample import sample
from diffusion.training.run import train
from diffusion.utils.errors import ConfigError

from conftest import TINY_UNET

PRESETS = ["digits_superres_4to8", "celeba_superres_32to64", "imagenet_superres_64to256"]
TINY_RUN = [
    "experiment=digits_superres_4to8", *TINY_UNET, "model.attention_resolutions=[4]",
    "diffusion.betas.num_diffusion_timesteps=20", "data.batch_size=16", "~callbacks.progress_bar",
    "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
    "+trainer.limit_test_batches=1", "callbacks.model_checkpoint.every_n_train_steps=3",
    "~callbacks.posthoc_ema", "trainer.log_every_n_steps=1",
]


@pytest.mark.parametrize("preset", PRESETS)
def test_superres_unet_takes_the_low_res_image_at_every_preset_size(compose_cfg, preset):
    cfg = compose_cfg("train", [f"experiment={preset}", "model.model_channels=32", "model.num_res_blocks=1",
                                "model.attention_resolutions=[]"])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg = {k: v for k, v in model_cfg.items() if k not in ("channels_last", "compile")}
    image_size, low = cfg.data.data.get("image_size", 64), cfg.data.low_res_size
    channels = 1 if "digits" in preset else 3
    num_classes = 3 if cfg.class_cond else None
    net = hydra.utils.instantiate(model_cfg)(image_size=image_size, in_channels=channels,
                                              out_channels=2 * channels, num_classes=num_classes)
    assert net.input_blocks[0][0].in_channels == 2 * channels  # x_t and the upsampled condition
    x = torch.randn(1, channels, image_size, image_size)
    y = torch.zeros(1, dtype=torch.long) if num_classes else None
    with torch.no_grad():
        out = net(x, torch.tensor([1]), low_res=torch.randn(1, channels, low, low), y=y)
    assert out.shape == (1, 2 * channels, image_size, image_size)
    with pytest.raises(ValueError, match=f"low_res of shape \\(1, {channels}, {low}, {low}\\)"):
        net(x, torch.tensor([1]), low_res=torch.randn(1, channels, low + 1, low + 1), y=y)


def test_pairs_hold_the_area_downsampled_image():
    data = SuperResData(DigitsData(batch_size=8), low_res_size=4)
    data.setup()
    images, kwargs = next(iter(data.val_dataloader()))
    assert images.shape == (8, 1, 8, 8) and kwargs["low_res"].shape == (8, 1, 4, 4)
    assert kwargs["y"].shape == (8,)
    mean_of_blocks = images.reshape(8, 1, 4, 2, 4, 2).mean(dim=(3, 5))  # 2x2 blocks: area averaging
    torch.testing.assert_close(kwargs["low_res"], mean_of_blocks, rtol=0, atol=1e-6)
    torch.testing.assert_close(kwargs["low_res"], F.interpolate(images, size=4, mode="area"))


@pytest.mark.slow
def test_tiny_run_loads_and_samples_with_low_res(compose_cfg, tmp_path):
    out = tmp_path / "run"
    train(compose_cfg("train", TINY_RUN, output_dir=out))
    ckpt = out / "checkpoints" / "last.ckpt"
    loaded = load_checkpoint(str(ckpt))
    assert loaded.model.low_res_size == 4 and loaded.image_shape == (1, 8, 8)
    low = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 1), dtype=np.uint8)
    np.savez(tmp_path / "low.npz", arr_0=low)
    common = ["progress=false", f"ckpt={ckpt}", "sampler=ddim10", "num_samples=5", "batch_size=4"]
    result = sample(compose_cfg("sample", [*common, f"low_res={tmp_path / 'low.npz'}",
                                           f"output_dir={tmp_path / 'samples'}"]))
    assert np.load(result["npz"])["arr_0"].shape == (5, 8, 8, 1)

    np.savez(tmp_path / "wrong.npz", arr_0=np.zeros((2, 8, 8, 1), np.uint8))
    for extra, message in ((f"low_res={tmp_path / 'wrong.npz'}", "takes 4x4x1"), (None, "super-resolution")):
        folder = tmp_path / f"bad{bool(extra)}"
        cfg = compose_cfg("sample", [*common, *([extra] if extra else []), f"output_dir={folder}"])
        with pytest.raises(ConfigError, match=message) as err:
            sample(cfg)
        assert "\n" not in str(err.value)
        assert not folder.exists() or not any(folder.iterdir())
