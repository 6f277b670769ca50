"""Super-resolution (IDDPM App. A; improved-diffusion's SuperResModel): the conditioned UNet
at every preset's size, the low-resolution pairs, a tiny training run sampled end to end,
low-resolution inputs from a split, edit.py task=superres, evaluate.py on a super-resolution
checkpoint, and the one-line errors."""

from __future__ import annotations

import json

import hydra
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from diffusion.checkpoint import load_checkpoint, split_model_config
from diffusion.data import DigitsData, SuperResData
from diffusion.jobs.edit import edit
from diffusion.jobs.evaluate import evaluate
from diffusion.jobs.sample import sample
from diffusion.jobs.superres import read_conditioning
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
    model_cfg, _ = split_model_config(OmegaConf.to_container(cfg.model, resolve=True))
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


# ----------------------------------------------- low-resolution inputs from a split; edit, evaluate
def job_cfg(compose_cfg, name, ckpt, out, *overrides):
    return compose_cfg(name, ["progress=false", f"ckpt={ckpt}", "sampler=ddim10", "sampler.steps=4", "batch_size=3",
                              *overrides], output_dir=out)


def test_low_res_from_a_split_is_the_training_pairs_and_edit_superres_samples_as_sample_py(
        compose_cfg, tiny_superres_ckpt, tmp_path):
    """``low_res=split:test`` is the first test images as SuperResData pairs them in training;
    edit.py task=superres draws batch i as sample.py does (npz and split inputs alike), with
    the bicubic upsampling and, from a split, the originals in the grid and the JSON."""
    loaded = load_checkpoint(tiny_superres_ckpt)
    cfg = job_cfg(compose_cfg, "sample", tiny_superres_ckpt, tmp_path / "s", "num_samples=5", "low_res=split:test")
    pairs = SuperResData(DigitsData(), low_res_size=4)
    pairs.setup()
    torch.testing.assert_close(read_conditioning(cfg, loaded)[0], torch.stack([pairs.test_set[i][1]["low_res"] for i in range(5)]),
                               rtol=0, atol=0)
    from_split = np.load(sample(cfg)["npz"])["arr_0"]
    report = edit(job_cfg(compose_cfg, "edit", tiny_superres_ckpt, tmp_path / "e", "task=superres", "num_images=5"))
    arrays = np.load(report["npz"])
    np.testing.assert_array_equal(arrays["arr_0"], from_split)
    assert arrays["low_res"].shape == (5, 4, 4, 1) and report["input"] == "split:test"
    assert report["mse_per_dim"] > 0 and report["bicubic_mse_per_dim"] > 0  # against the originals
    assert Image.open(report["grid"]).size == (2 + 5 * 10, 2 + 3 * 10)  # bicubic, outputs, originals
    low = np.random.default_rng(0).integers(0, 256, (4, 4, 4, 1), dtype=np.uint8)
    np.savez(tmp_path / "low.npz", arr_0=low)
    report = edit(job_cfg(compose_cfg, "edit", tiny_superres_ckpt, tmp_path / "n", "task=superres",
                          f"input={tmp_path / 'low.npz'}"))
    np.testing.assert_array_equal(np.load(report["npz"])["low_res"], low)
    cfg = job_cfg(compose_cfg, "sample", tiny_superres_ckpt, tmp_path / "sn", "num_samples=4",
                  f"low_res={tmp_path / 'low.npz'}")
    np.testing.assert_array_equal(np.load(report["npz"])["arr_0"], np.load(sample(cfg)["npz"])["arr_0"])
    assert "mse_per_dim" not in report and Image.open(report["grid"]).size[1] == 2 + 2 * 10


@pytest.mark.parametrize(("job", "ckpt", "overrides", "message"), [
    ("edit", "superres", ["task=superres", "input=HIGH"], r"input=.*high.npz is 8x8x1 \(HxWxC\); the checkpoint "
                                                          "takes 4x4x1"),
    ("edit", "superres", ["task=superres", "input=RGB"], "is 4x4x3 .*takes 4x4x1.* with 1 channel"),
    ("edit", "superres", ["task=reconstruct"], r"is a super-resolution model \(4x4 -> 8x8\): pass task=superres"),
    ("edit", "plain", ["task=superres"], "task=superres needs a super-resolution checkpoint"),
    ("sample", "superres", ["low_res=split:bogus"], "low_res=split:bogus: 'bogus' is not a split"),
    ("sample", "plain", ["low_res=split:test"], "the checkpoint is not a super-resolution model"),
])
def test_bad_low_res_input_is_one_line_and_nothing_is_written(compose_cfg, tiny_ckpt, tiny_superres_ckpt, tmp_path,
                                                              job, ckpt, overrides, message):
    np.savez(tmp_path / "high.npz", arr_0=np.zeros((2, 8, 8, 1), np.uint8))
    np.savez(tmp_path / "rgb.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    overrides = [o.replace("HIGH", str(tmp_path / "high.npz")).replace("RGB", str(tmp_path / "rgb.npz"))
                 for o in overrides]
    cfg = job_cfg(compose_cfg, job, tiny_superres_ckpt if ckpt == "superres" else tiny_ckpt, tmp_path / "out",
                  *overrides)
    with pytest.raises(ConfigError, match=message) as err:
        (edit if job == "edit" else sample)(cfg)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_evaluate_nll_and_fid_condition_on_the_split(compose_cfg, tiny_superres_ckpt, tmp_path):
    """metric=nll (and ode_nll) feeds each test pair's low_res to the model; metric=fid conditions sample i
    on the low-resolution test image i (the samples are sample.py low_res=split:test's) and
    scores them with the digits classifier, the high-resolution images' features."""
    nll = evaluate(job_cfg(compose_cfg, "evaluate", tiny_superres_ckpt, tmp_path / "nll", "metric=nll",
                           "max_batches=1", "batch_size=4"))
    assert nll["num_images"] == 4 and np.isfinite(nll["bpd"])
    ode = evaluate(job_cfg(compose_cfg, "evaluate", tiny_superres_ckpt, tmp_path / "ode", "metric=ode_nll",
                           "max_batches=1", "batch_size=2", "ode_rtol=1e-2", "ode_atol=1e-2"))
    assert ode["num_images"] == 2 and np.isfinite(ode["bpd"])
    fid = evaluate(job_cfg(compose_cfg, "evaluate", tiny_superres_ckpt, tmp_path / "fid", "metric=fid",
                           "num_samples=12", f"cache_dir={tmp_path / 'cache'}", "kid_subset_size=4",
                           "memorisation_pairs=0"))
    assert np.isfinite(fid["fid_digits"]) and fid["num_samples"] == 12
    drawn = np.load(next((tmp_path / "fid").glob("samples_12x8x8x1.npz")))["arr_0"]
    cfg = job_cfg(compose_cfg, "sample", tiny_superres_ckpt, tmp_path / "s", "num_samples=12", "low_res=split:test")
    np.testing.assert_array_equal(drawn, np.load(sample(cfg)["npz"])["arr_0"])


def test_the_jobs_read_a_wrapped_datasets_training_split_without_flips(tmp_path):
    """data_for (FID's reference set, low_res=split:train, edit.py's split inputs) turns off
    random_flip of the dataset a super-resolution config wraps too: every read of a training
    image gives the same pixels, so a resumed job pairs its inputs with the same shards."""
    from types import SimpleNamespace

    from diffusion.jobs.evaluate import data_for, split_loader

    rng = np.random.default_rng(0)
    for k in range(8):  # noise: a flipped image differs from the original
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
    wrapped = {"_target_": "diffusion.data.ImageFolderData", "root": str(tmp_path), "image_size": 16,
               "labels": "none", "random_flip": True, "val_fraction": 0.25, "test_fraction": 0.25,
               "batch_size": 4, "num_workers": 0, "pin_memory": False, "persistent_workers": False}
    loaded = SimpleNamespace(config={"data": {"_target_": "diffusion.data.SuperResData", "low_res_size": 8,
                                              "data": wrapped}})
    data = data_for(OmegaConf.create({"ckpt": "run.ckpt", "batch_size": 4, "data": None}), loaded)
    assert isinstance(data, SuperResData) and data.data.random_flip is False
    reads = [torch.cat([images for images, _ in split_loader(data, "train")]) for _ in range(6)]
    assert all(torch.equal(reads[0], other) for other in reads[1:])


def test_class_labels_input_gives_each_sample_the_label_of_its_low_res_split_image(
        compose_cfg, tiny_superres_ckpt, tmp_path):
    """A class-conditional super-resolution model with low_res=split:test and class_labels=input:
    sample i is conditioned on test image i's low-resolution version and on its label (arr_1),
    cycled over the batches; the other sources of labels or images are refused in one line."""
    from conftest import train_checkpoint

    (tmp_path / "cond_run").mkdir()
    cond = train_checkpoint(tmp_path / "cond_run", [
        "experiment=digits_superres_4to8", *TINY_UNET, "model.attention_resolutions=[4]", "class_cond=true",
        "diffusion.betas.num_diffusion_timesteps=20", "data.batch_size=16", "~callbacks.progress_bar",
        "trainer.max_steps=2", "test_after_fit=false", "trainer.limit_val_batches=0", "~callbacks.posthoc_ema"])
    pairs = SuperResData(DigitsData(), low_res_size=4)
    pairs.setup()
    expected = [int(pairs.test_set[i][1]["y"]) for i in range(5)]
    cfg = job_cfg(compose_cfg, "sample", cond, tmp_path / "s", "num_samples=5", "batch_size=3", "low_res=split:test",
                  "class_labels=input")  # two batches: 3 + 2
    arrays = np.load(sample(cfg)["npz"])
    assert arrays["arr_1"].tolist() == expected and len(set(expected)) > 1
    # evaluate.py metric=fid: low_res=split:test set by evaluate itself, the labels named in the protocol
    fid_args = ["metric=fid", "num_samples=20", "batch_size=20", "kid_subsets=10", f"cache_dir={tmp_path / 'cache'}"]
    evaluate(job_cfg(compose_cfg, "evaluate", cond, tmp_path / "eval", *fid_args, "class_labels=input"))
    written = json.loads((tmp_path / "eval" / "fid.json").read_text())
    assert written["sampling"]["class_labels"] == "input" and written["sampling"]["low_res"] == "split:test"
    drawn = np.load(written["samples"])["arr_1"]
    assert drawn.tolist() == [int(pairs.test_set[i][1]["y"]) for i in range(20)]
    # an unconditional model: refused before the classifier and the reference features are made
    with pytest.raises(ConfigError, match="class_labels=input gives each sample the label"):
        evaluate(job_cfg(compose_cfg, "evaluate", tiny_superres_ckpt, tmp_path / "bad_eval", *fid_args[:-1],
                         f"cache_dir={tmp_path / 'bad_cache'}", "class_labels=input"))
    assert not (tmp_path / "bad_cache").exists() and not (tmp_path / "bad_eval").exists()
    # a cascade: an npz with labels (arr_1, as sample.py writes it for a class-conditional base model)
    low = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 1), dtype=np.uint8)
    np.savez(tmp_path / "cascade.npz", arr_0=low, arr_1=np.array([7, 2, 9]))
    cascade = job_cfg(compose_cfg, "sample", cond, tmp_path / "c", "num_samples=5", "batch_size=3",
                      f"low_res={tmp_path / 'cascade.npz'}", "class_labels=input")
    assert np.load(sample(cascade)["npz"])["arr_1"].tolist() == [7, 2, 9, 7, 2]  # cycled with the images
    np.savez(tmp_path / "low.npz", arr_0=np.zeros((2, 4, 4, 1), np.uint8))
    bad = job_cfg(compose_cfg, "sample", cond, tmp_path / "bad", "num_samples=2", f"low_res={tmp_path / 'low.npz'}",
                  "class_labels=input")
    with pytest.raises(ConfigError, match=r"class_labels=input: low_res=.*low.npz holds no labels \(arr_1"):
        sample(bad)
    for ckpt, low_res in ((cond, f"{tmp_path}"), (tiny_superres_ckpt, "split:test")):
        bad = job_cfg(compose_cfg, "sample", ckpt, tmp_path / "bad", "num_samples=2", f"low_res={low_res}",
                      "class_labels=input")
        with pytest.raises(ConfigError, match="class_labels=input gives each sample the label of its low-resolution"):
            sample(bad)
        assert not (tmp_path / "bad").exists()


def test_a_changed_low_res_file_is_refused_on_resume(compose_cfg, tiny_superres_ckpt, tmp_path, monkeypatch):
    """The shard key holds a digest of the low-resolution images read: a job stopped after
    its first batch, whose low_res npz is then rewritten with other images under the same
    name, is refused instead of finishing with shards of both."""
    from diffusion.jobs.shards import ShardsMismatchError

    from test_job_faults import interrupted_run

    rng = np.random.default_rng(0)
    low = tmp_path / "low.npz"
    np.savez(low, arr_0=rng.integers(0, 256, (4, 4, 4, 1), dtype=np.uint8))
    cfg = job_cfg(compose_cfg, "sample", tiny_superres_ckpt, tmp_path / "run", "num_samples=4", "batch_size=2",
                  f"low_res={low}")
    interrupted_run(cfg, monkeypatch)
    np.savez(low, arr_0=rng.integers(0, 256, (4, 4, 4, 1), dtype=np.uint8))  # other images, same name
    with pytest.raises(ShardsMismatchError, match="conditioning_sha256"):
        sample(cfg)


def test_split_labels_are_checked_against_the_model():
    from diffusion.jobs.inputs import checked_labels

    assert checked_labels("class_labels", torch.tensor([0, 2, 1]), "split test", 3).dtype == torch.int64
    with pytest.raises(ConfigError, match="class_labels=input: split test of the dataset has no labels"):
        checked_labels("class_labels", None, "split test of the dataset", 3)
    with pytest.raises(ConfigError, match="labels up to 5, outside the checkpoint's classes 0..2"):
        checked_labels("class_labels", torch.tensor([0, 5]), "split test", 3)
