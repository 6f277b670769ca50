"""sample.py and evaluate.py: outputs, determinism, resume, the analytic denoiser, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion import GaussianDiffusion, get_named_beta_schedule
from diffusion.checkpoint import CheckpointError, LoadedCheckpoint
from diffusion.jobs import evaluate as evaluate_job
from diffusion.jobs import sample as sample_job
from diffusion.jobs.evaluate import evaluate
from diffusion.jobs.sample import sample
from diffusion.process.analytic import GaussianDataDenoiser

from conftest import REPO
from test_sampling import assert_moments, chain_moments


def sample_cfg(compose_cfg, tmp_path, *overrides):
    return compose_cfg("sample", ["progress=false", *overrides], output_dir=tmp_path / "samples")


def test_sample_writes_npz_and_grid(compose_cfg, tiny_ckpt, tmp_path):
    cfg = sample_cfg(compose_cfg, tmp_path, f"ckpt={tiny_ckpt}", "sampler=ddim10", "num_samples=6", "batch_size=4")
    out = sample(cfg)
    arrays = np.load(out["npz"])
    assert arrays["arr_0"].dtype == np.uint8 and arrays["arr_0"].shape == (6, 8, 8, 1)
    assert "arr_1" not in arrays.files  # unconditional model
    assert Image.open(out["grid"]).size[0] > 8
    assert out["weights"] == "ema_0.99"
    leftovers = [n for n in os.listdir(tmp_path / "samples") if n.endswith(".tmp") or n.endswith("_shards")]
    assert leftovers == []


def test_same_seed_same_images_and_other_seed_differs(compose_cfg, tiny_ckpt, tmp_path):
    def draw(seed, folder):
        cfg = compose_cfg("sample", ["progress=false", f"ckpt={tiny_ckpt}", "sampler=ddim10", "num_samples=4",
                                     "batch_size=2", f"seed={seed}"], output_dir=tmp_path / folder)
        return np.load(sample(cfg)["npz"])["arr_0"]

    np.testing.assert_array_equal(draw(3, "a"), draw(3, "b"))
    assert not np.array_equal(draw(3, "a"), draw(4, "c"))


def test_interrupted_sampling_keeps_finished_shards(compose_cfg, tiny_ckpt, tmp_path, monkeypatch):
    """A job killed after its first batch resumes from the shard and ends with the same images."""
    overrides = [f"ckpt={tiny_ckpt}", "sampler=ddim10", "num_samples=4", "batch_size=2"]
    reference = np.load(sample(sample_cfg(compose_cfg, tmp_path / "ref", *overrides))["npz"])["arr_0"]

    calls = {"n": 0}
    original = sample_job.sample_batch

    def crash_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated pre-emption")
        return original(*args, **kwargs)

    monkeypatch.setattr(sample_job, "sample_batch", crash_on_second)
    cfg = sample_cfg(compose_cfg, tmp_path / "run", *overrides)
    with pytest.raises(KeyboardInterrupt):
        sample(cfg)
    npz, _, shards = sample_job.output_paths(cfg, (1, 8, 8))
    assert not os.path.exists(npz) and sorted(os.listdir(shards)) == ["batch_000000.npz", "manifest.json"]

    monkeypatch.setattr(sample_job, "sample_batch", original)
    resumed = np.load(sample(cfg)["npz"])["arr_0"]
    np.testing.assert_array_equal(resumed, reference)


def test_evaluate_nll_writes_json(compose_cfg, tiny_ckpt, tmp_path):
    cfg = compose_cfg("evaluate", [f"ckpt={tiny_ckpt}", "metric=nll", "max_batches=1", "batch_size=8",
                                   "progress=false"], output_dir=tmp_path / "eval")
    results = evaluate(cfg)
    saved = json.load(open(tmp_path / "eval" / "nll.json"))
    assert saved["bpd"] == pytest.approx(results["bpd"]) and saved["num_images"] == 8
    assert len(saved["vb_terms_bpd"]) == 50
    # The total is the prior plus every term of the bound (DDPM eq. 5).
    assert saved["bpd"] == pytest.approx(saved["prior_bpd"] + sum(saved["vb_terms_bpd"]), rel=1e-5)


def test_evaluate_nll_hands_its_device_to_the_bpd_loop(compose_cfg, tiny_ckpt, tmp_path, monkeypatch):
    """The job's model is an autocast closure, from which no device can be read: the job must
    say where the batches go, or a CUDA network would get CPU images (a CPU-only check of
    what test_evaluate_nll_on_cuda runs for real)."""
    seen = {}
    real = evaluate_job.evaluate_bpd

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_job, "evaluate_bpd", spy)
    cfg = compose_cfg("evaluate", [f"ckpt={tiny_ckpt}", "metric=nll", "max_batches=1", "batch_size=4",
                                   "progress=false", "device=cpu"], output_dir=tmp_path / "eval")
    evaluate(cfg)
    assert seen["device"] == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluate_nll_on_cuda(compose_cfg, tiny_ckpt, tmp_path):
    args = [f"ckpt={tiny_ckpt}", "metric=nll", "max_batches=1", "batch_size=8", "progress=false"]
    on_cpu = evaluate(compose_cfg("evaluate", [*args, "device=cpu"], output_dir=tmp_path / "cpu"))
    on_cuda = evaluate(compose_cfg("evaluate", [*args, "device=cuda"], output_dir=tmp_path / "cuda"))
    assert on_cuda["num_images"] == 8
    # The job's generator lives on its device, so the noise differs: the same bound, to the
    # Monte-Carlo error of 8 images.
    assert on_cuda["bpd"] == pytest.approx(on_cpu["bpd"], rel=0.05)


def test_evaluate_fid_on_digits(compose_cfg, tiny_ckpt, tmp_path, monkeypatch):
    """metric=fid draws its samples with the sample job, and the process loads the checkpoint
    and builds the sampler once (they were loaded three and built twice)."""
    loads, samplers = [], []
    real_load, real_instantiate = sample_job.load_checkpoint, sample_job.hydra.utils.instantiate
    for module in (sample_job, evaluate_job):
        monkeypatch.setattr(module, "load_checkpoint", lambda *a, **k: loads.append(a) or real_load(*a, **k),
                            raising=False)  # evaluate loads through the sample job's load_chosen_weights
    monkeypatch.setattr(sample_job.hydra.utils, "instantiate",
                        lambda node, *a, **k: samplers.append(node) or real_instantiate(node, *a, **k))
    cfg = compose_cfg("evaluate", [f"ckpt={tiny_ckpt}", "metric=fid", "sampler=ddim10", "num_samples=20",
                                   "batch_size=20", "progress=false", f"cache_dir={tmp_path / 'cache'}"],
                      output_dir=tmp_path / "eval")
    results = evaluate(cfg)
    assert results["fid_digits"] > 0 and results["num_samples"] == 20
    assert results["classifier_test_accuracy"] > 0.9
    # the metrics beyond FID, on the same features, in the same JSON
    written = json.loads((tmp_path / "eval" / "fid.json").read_text())
    assert 0 <= written["precision"] <= 1 and 0 <= written["recall"] <= 1 and written["nearest_k"] == 3
    assert np.isfinite(written["kid"]) and written["kid_std"] >= 0 and written["kid_subset_size"] == 20
    assert 0 <= written["memorisation_share"] <= 1 and len(written["memorisation_pairs"]) == 16
    assert written["reference"] == {"dataset": "digits", "split": "train", "num_images": 1437}
    assert written["feature_extractor"].startswith("digits-cnn") and written["seed"] == 0
    assert written["nfe"] == 10 and written["sampler"]["_target_"] == "diffusion.sampling.DDIMSampler"
    assert written["weights"] and written["ckpt"] == os.path.abspath(tiny_ckpt)
    with Image.open(written["memorisation_grid"]) as grid:  # 16 pairs, 8 images a row
        assert grid.size == (8 * 10 + 2, 4 * 10 + 2)
    assert len(loads) == 1
    built = [node["_target_"] for node in samplers if "sampling" in str(node.get("_target_", ""))]
    assert built == ["diffusion.sampling.DDIMSampler"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["memorisation_threshold=0"], "memorisation_threshold=0 must be in \\(0, 1\\]"),
    (["memorisation_threshold=1.5"], "memorisation_threshold=1.5 must be in"),
    (["nearest_k=20"], "nearest_k=20 needs more samples than k: set num_samples=21"),
    (["num_samples=2000"], "has 1437 images, fewer than the 2000 samples: set num_samples=1437 or less"),
])
def test_evaluate_fid_bad_input_writes_nothing(compose_cfg, tiny_ckpt, tmp_path, overrides, message):
    cfg = compose_cfg("evaluate", [f"ckpt={tiny_ckpt}", "metric=fid", "sampler=ddim10", "num_samples=20",
                                   "progress=false", f"cache_dir={tmp_path / 'cache'}", *overrides],
                      output_dir=tmp_path / "eval")
    with pytest.raises(ValueError, match=message):
        evaluate(cfg)
    assert not (tmp_path / "eval" / "fid.json").exists() and not list((tmp_path / "eval").glob("samples_*"))


# ------------------------------------------------------------- the analytic denoiser
MU, STD, T = 0.0, 0.25, 100


@pytest.mark.parametrize("overrides, kind", [
    (["sampler=ddpm"], "ddpm"),
    (["sampler=ddim50"], "ddim"),
    (["sampler=ddpm", "sampler.respacing='10,15,20'"], "ddpm"),
])
def test_sample_job_with_the_analytic_denoiser(compose_cfg, tmp_path, monkeypatch, overrides, kind):
    """The sample job's output (uint8, via shards) has the exact moments of its sampler's
    chain when the model is the Bayes-optimal denoiser of N(0, 0.25^2) data."""
    process = GaussianDiffusion(betas=get_named_beta_schedule("linear", T), model_mean_type="epsilon",
                                model_var_type="fixed_small", loss_type="mse")
    loaded = LoadedCheckpoint(model=GaussianDataDenoiser(process, MU, STD), diffusion=process, config={},
                              image_shape=(1, 2, 2), num_classes=None, weights="analytic", global_step=None)
    monkeypatch.setattr(sample_job, "load_checkpoint", lambda path, weights: loaded)
    cfg = sample_cfg(compose_cfg, tmp_path, "ckpt=analytic", *overrides, "num_samples=4000", "batch_size=1000",
                     "clip_denoised=false", "device=cpu")
    images = np.load(sample(cfg)["npz"])["arr_0"].astype(np.float64) / 127.5 - 1
    sampler = sample_job.hydra.utils.instantiate(cfg.sampler)
    mean, var = chain_moments(process.alphas_cumprod, sampler.timesteps(T), kind, mu=MU, s=STD)
    # uint8 rounding adds a uniform error of variance (1/127.5)^2/12 (Sheppard's correction).
    assert_moments(torch.from_numpy(images), mean, var + (1 / 127.5) ** 2 / 12)


# ------------------------------------------------------------------------ bad input
def run_cli(script, *args):
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_missing_and_corrupt_checkpoints(compose_cfg, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.ckpt"):
        sample(sample_cfg(compose_cfg, tmp_path, f"ckpt={tmp_path / 'nope.ckpt'}"))
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x80\x02 this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        sample(sample_cfg(compose_cfg, tmp_path, f"ckpt={corrupt}"))
    assert not list(tmp_path.rglob("*.npz"))  # nothing written, not even a shard


def test_more_steps_than_the_process_has(compose_cfg, tiny_ckpt, tmp_path):
    cfg = sample_cfg(compose_cfg, tmp_path, f"ckpt={tiny_ckpt}", "sampler=ddim100")
    with pytest.raises(ValueError, match="100 steps .* only 50"):
        sample(cfg)
    assert not (tmp_path / "samples").exists() or not list((tmp_path / "samples").rglob("*.npz"))


@pytest.mark.slow
def test_cli_errors_are_one_line(tiny_ckpt, tmp_path):
    out = f"hydra.run.dir={tmp_path / 'cli'}"
    missing = run_cli("sample.py", f"ckpt={tmp_path / 'missing.ckpt'}", out)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("error: checkpoint not found")
    unknown = run_cli("sample.py", f"ckpt={tiny_ckpt}", "sampler=ddim51", out)
    assert unknown.returncode != 0 and "ddim50" in unknown.stderr  # Hydra lists the choices
    too_many = run_cli("sample.py", f"ckpt={tiny_ckpt}", "sampler=ddim250", out)
    assert too_many.returncode == 2 and "only 50" in too_many.stderr.strip().splitlines()[-1]
    assert not list((tmp_path / "cli").rglob("*.npz"))


def test_sample_from_a_converted_improved_diffusion_checkpoint(compose_cfg, tmp_path):
    """python -m diffusion.convert's output feeds sample.py directly (class-conditional,
    learned sigmas): the converted weights are used as they are."""
    from diffusion.checkpoint import load_checkpoint
    from diffusion.convert import main as convert_main

    from test_convert import CLI_ARGS, tiny_iddpm_state_dict

    state = tiny_iddpm_state_dict()
    torch.save(state, tmp_path / "model.pt")
    args = [a if a != "4000" else "50" for a in CLI_ARGS]  # a short process for the test
    convert_main([str(tmp_path / "model.pt"), str(tmp_path / "converted.ckpt"), *args])
    loaded = load_checkpoint(str(tmp_path / "converted.ckpt"))
    assert loaded.weights == "raw" and loaded.num_classes == 1000
    for key, value in state.items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, rtol=0, atol=0)
    cfg = sample_cfg(compose_cfg, tmp_path, f"ckpt={tmp_path / 'converted.ckpt'}", "sampler=ddim10",
                     "num_samples=3", "batch_size=3", "class_labels=[7,8]")
    arrays = np.load(sample(cfg)["npz"])
    assert arrays["arr_0"].shape == (3, 16, 16, 3) and arrays["arr_1"].tolist() == [7, 8, 7]


def test_sample_compile_runs_the_compiled_network_and_keys_its_shards(compose_cfg, tiny_ckpt, tmp_path, monkeypatch):
    """compile=true samples through torch.compile (here its eager backend, which traces the
    network with Dynamo but keeps its kernels: the same images), and is part of the shard key,
    so that a resumed run never mixes compiled and eager batches."""
    import functools

    from diffusion.checkpoint import load_checkpoint
    from diffusion.jobs.shards import shard_key

    monkeypatch.setattr(torch.nn.Module, "compile", functools.partialmethod(torch.nn.Module.compile, backend="eager"))
    overrides = [f"ckpt={tiny_ckpt}", "sampler=ddim10", "num_samples=4", "batch_size=2"]
    eager_cfg = sample_cfg(compose_cfg, tmp_path / "eager", *overrides)
    compiled_cfg = sample_cfg(compose_cfg, tmp_path / "compiled", *overrides, "compile=true")
    loaded = load_checkpoint(tiny_ckpt, weights="ema")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps them: earlier tests' graphs would count
    compiled = np.load(sample(compiled_cfg, loaded)["npz"])["arr_0"]
    assert loaded.model._compiled_call_impl is not None  # the job compiled the network it sampled with
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    np.testing.assert_array_equal(compiled, np.load(sample(eager_cfg)["npz"])["arr_0"])
    assert shard_key(compiled_cfg, loaded, "cpu") != shard_key(eager_cfg, loaded, "cpu")
    assert "compile" not in shard_key(eager_cfg, loaded, "cpu")  # earlier manifests still match
    with pytest.raises(ValueError, match="compile"):
        sample(sample_cfg(compose_cfg, tmp_path / "bad", *overrides, "compile=maybe"))
    with pytest.raises(ValueError, match="compiled by an earlier compile=true job"):
        sample(sample_cfg(compose_cfg, tmp_path / "eager2", *overrides), loaded)  # its key would say eager


@pytest.mark.parametrize("extra", [["metric=nll"], ["metric=ode_nll"], ["metric=fid", "samples=x.npz"]])
@pytest.mark.parametrize("setting, message", [
    ("compile=true", r"compile=true compiles the network for sampling.*remove compile=true"),
    ("class_labels=3", r"class_labels=3 sets how samples are drawn, and metric=.* draws none: remove class_labels"),
    ("low_res=split:test", r"low_res=split:test sets how samples are drawn.*remove low_res"),
])
def test_evaluate_refuses_drawing_settings_where_it_draws_no_samples(compose_cfg, tiny_ckpt, tmp_path, extra,
                                                                     setting, message):
    cfg = compose_cfg("evaluate", [f"ckpt={tiny_ckpt}", *extra, setting, "progress=false"],
                      output_dir=tmp_path / "eval")
    with pytest.raises(ValueError, match=message):
        evaluate(cfg)
    assert not (tmp_path / "eval").exists()


def test_the_jobs_keep_freed_host_memory(compose_cfg, tiny_ckpt, tmp_path, monkeypatch):
    """sample's batches and evaluate ask glibc to keep freed memory (utils/host_memory.py)."""
    calls = []
    monkeypatch.setattr(sample_job, "retain_freed_memory", lambda: calls.append("sample"))
    monkeypatch.setattr(evaluate_job, "retain_freed_memory", lambda: calls.append("evaluate"))
    sample(sample_cfg(compose_cfg, tmp_path, f"ckpt={tiny_ckpt}", "sampler=ddim10", "num_samples=2", "batch_size=2"))
    evaluate(compose_cfg("evaluate", [f"ckpt={tiny_ckpt}", "metric=nll", "max_batches=1", "batch_size=4",
                                      "progress=false"], output_dir=tmp_path / "eval"))
    assert calls == ["sample", "evaluate"]
