"""The one checkpoint layout: written by training and the converter, read by the jobs, and
older checkpoints (moved classes, the converter's first layout) still read."""

from __future__ import annotations

import pytest
import torch

from diffusion.checkpoint import checkpoint_dict, load_checkpoint, run_config, save_checkpoint
from diffusion.data.image_data import DigitsData

TINY_UNET = {"_target_": "diffusion.nets.unet.UNet", "model_channels": 32, "channel_mult": [1, 2],
             "num_res_blocks": 1, "attention_resolutions": []}
DIFFUSION = {"_target_": "diffusion.process.gaussian_diffusion.GaussianDiffusion",
             "betas": {"_target_": "diffusion.process.schedules.get_named_beta_schedule",
                       "schedule_name": "linear", "num_diffusion_timesteps": 40},
             "model_mean_type": "epsilon", "model_var_type": "learned_range", "loss_type": "rescaled_mse"}


def unet_state(in_channels: int = 1, image_size: int = 8) -> dict[str, torch.Tensor]:
    from diffusion.nets.unet import UNet

    kwargs = {k: v for k, v in TINY_UNET.items() if k != "_target_"}
    net = UNet(image_size=image_size, in_channels=in_channels, out_channels=2 * in_channels, **kwargs)
    return net.state_dict()


def test_a_written_checkpoint_rebuilds_the_network_with_its_weights(tmp_path):
    state = unet_state()
    config = {"model": TINY_UNET, "diffusion": DIFFUSION}
    save_checkpoint(checkpoint_dict(state, config, image_size=8, in_channels=1, num_classes=None),
                    tmp_path / "a.ckpt")
    loaded = load_checkpoint(str(tmp_path / "a.ckpt"), weights="raw")
    assert loaded.image_shape == (1, 8, 8) and loaded.num_classes is None and loaded.weights == "raw"
    assert loaded.model.out_channels == 2  # learned_range: the process decides the width
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_older_checkpoints_still_read(tmp_path):
    """The converter's first layout kept the config under "config" with the shape in its data
    entry; train.py's kept the data class under its old name."""
    old_data = {"_target_": "diffusion.training.data.DigitsDataModule", "batch_size": 4}
    legacy = {"state_dict": {f"model.{k}": v for k, v in unet_state(3, 16).items()},
              "hyper_parameters": {"config": {"model": TINY_UNET, "diffusion": DIFFUSION, "data": {
                  "image_size": 16, "channels": 3, "num_classes": None, **old_data}}}}
    torch.save(legacy, tmp_path / "old.ckpt")
    config, hparams = run_config(legacy, "old.ckpt")
    assert (hparams["image_size"], hparams["in_channels"], hparams["num_classes"]) == (16, 3, None)
    assert config["data"]["_target_"] == "diffusion.data.DigitsData"
    import hydra

    assert isinstance(hydra.utils.instantiate({"_target_": config["data"]["_target_"]}), DigitsData)
    assert load_checkpoint(str(tmp_path / "old.ckpt")).image_shape == (3, 16, 16)


@pytest.mark.parametrize("mode, expected", [(None, {}), ("reduce-overhead", {"mode": "reduce-overhead"}),
                                            ("max-autotune", {"mode": "max-autotune"})])
def test_prepare_network_compiles_in_the_chosen_mode(monkeypatch, mode, expected):
    """model.compile_mode reaches nn.Module.compile; none is passed when unset (a non-Inductor
    backend refuses a mode); an unknown mode is refused before anything compiles."""
    from torch import nn

    from diffusion.checkpoint import prepare_network, split_model_config

    calls = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kwargs: calls.append(kwargs))
    unet, runtime = split_model_config({"model_channels": 32, "compile": True, "compile_mode": mode})
    assert unet == {"model_channels": 32} and runtime == {"compile": True, **({} if mode is None else {"compile_mode": mode})}
    prepare_network(nn.Linear(2, 2), **runtime)
    assert calls == [expected]
    prepare_network(nn.Linear(2, 2), compile=False, compile_mode=mode)
    assert calls == [expected]  # no compile without compile=True
    with pytest.raises(ValueError, match="compile_mode='fast'.*reduce-overhead"):
        prepare_network(nn.Linear(2, 2), compile=True, compile_mode="fast")
