"""evaluate.py's written-down protocol (what every result was computed from), num_seeds, and
the sample sets and reference sets it refuses."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from diffusion.jobs.evaluate import evaluate


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One digits classifier and one reference cache for the module (trained on first use)."""
    return tmp_path_factory.mktemp("fid_cache")


def fid_cfg(compose_cfg, ckpt, out, cache, *overrides):
    return compose_cfg("evaluate", [f"ckpt={ckpt}", "metric=fid", "sampler=ddim10", "num_samples=20",
                                    "batch_size=20", "progress=false", f"cache_dir={cache}", "kid_subsets=10",
                                    *overrides], output_dir=out)


def test_num_seeds_reports_every_seed_and_their_spread(compose_cfg, tiny_ckpt, cache_dir, tmp_path):
    """num_seeds=2 scores seeds 0 and 1 apart, each exactly as a num_seeds=1 run of that
    seed, and reports per metric the values, mean, std (ddof=1) and min."""
    both = evaluate(fid_cfg(compose_cfg, tiny_ckpt, tmp_path / "both", cache_dir, "num_seeds=2"))
    alone = evaluate(fid_cfg(compose_cfg, tiny_ckpt, tmp_path / "alone", cache_dir, "seed=1"))
    written = json.loads((tmp_path / "both" / "fid.json").read_text())
    assert written["seeds"] == [0, 1] and written["num_seeds"] == 2 and written["seed"] == 0
    assert written["samples"] == [str(tmp_path / "both" / f"seed{s}" / "samples_20x8x8x1.npz") for s in (0, 1)]
    spread = written["over_seeds"]
    assert spread["std_ddof"] == 1
    metrics = {"fid_digits", "classifier_score", "classifier_score_std", "precision", "recall", "kid", "kid_std",
               "memorisation_share"}
    assert set(spread) == metrics | {"std_ddof"}
    for key in metrics:
        values = np.array(spread[key]["per_seed"])
        assert len(values) == 2 and values[1] == alone[key], key  # seed 1 is the seed=1 run, bit for bit
        assert spread[key]["mean"] == pytest.approx(values.mean(), rel=1e-12) == written[key]
        assert spread[key]["std"] == pytest.approx(abs(values[0] - values[1]) / np.sqrt(2), rel=1e-9)
        assert spread[key]["min"] == values.min()
    assert spread["fid_digits"]["per_seed"][0] != spread["fid_digits"]["per_seed"][1]  # other samples
    # one seed: the same format as before, with the protocol's fields added
    assert "over_seeds" not in alone and alone["seeds"] == [1] and alone["num_seeds"] == 1
    assert alone["samples"] == str(tmp_path / "alone" / "samples_20x8x8x1.npz")
    assert both["memorisation_grid"] == str(tmp_path / "both" / "memorisation.png")


def test_every_fid_result_names_its_protocol(compose_cfg, tiny_ckpt, cache_dir, tmp_path):
    evaluate(fid_cfg(compose_cfg, tiny_ckpt, tmp_path / "eval", cache_dir, "weights=raw"))
    written = json.loads((tmp_path / "eval" / "fid.json").read_text())
    assert written["num_samples"] == 20
    assert written["reference"] == {"dataset": "digits", "split": "train", "num_images": 1437}
    classifier = next(cache_dir.glob("digits-cnn-*.pt"))  # the digits classifier's weights file
    assert written["feature_extractor"] == classifier.stem
    assert written["feature_extractor_sha256"] == hashlib.sha256(classifier.read_bytes()).hexdigest()
    assert written["sampler"]["_target_"] == "diffusion.sampling.DDIMSampler" and written["nfe"] == 10
    assert written["sampling"] == {"precision": "32", "clip_denoised": True, "class_labels": None, "low_res": None,
                                   "compile": False}
    assert written["ckpt"] == tiny_ckpt and written["weights"] == "raw" and written["ema_std"] is None
    assert written["global_step"] == 4 and written["seed"] == 0 and written["seeds"] == [0]
    # the reference features are cached under the extractor's name and weights
    assert (cache_dir / f"digits-train-{classifier.stem}-{written['feature_extractor_sha256'][:12]}.npz").is_file()


def test_a_given_sample_set_leaves_the_drawing_settings_unknown(compose_cfg, tiny_ckpt, cache_dir, tmp_path):
    """samples= an npz from elsewhere: the protocol names the file, and says nothing of how it
    was drawn (sampler, nfe and sampling are null) rather than the settings of this config."""
    rng = np.random.default_rng(0)
    npz = write_npz(tmp_path / "given.npz", rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8))
    evaluate(fid_cfg(compose_cfg, tiny_ckpt, tmp_path / "eval", cache_dir, f"samples={npz}", "precision=bf16"))
    written = json.loads((tmp_path / "eval" / "fid.json").read_text())
    assert written["samples"] == str(npz)
    assert written["sampler"] is None and written["nfe"] is None and written["sampling"] is None


def test_nll_results_name_their_protocol_too(compose_cfg, tiny_ckpt, tmp_path):
    evaluate(compose_cfg("evaluate", [f"ckpt={tiny_ckpt}", "metric=nll", "max_batches=1", "batch_size=4",
                                      "progress=false", "seed=3"], output_dir=tmp_path / "eval"))
    written = json.loads((tmp_path / "eval" / "nll.json").read_text())
    assert {key: written[key] for key in ("metric", "split", "seed", "ckpt", "weights", "ema_std")} == {
        "metric": "nll", "split": "test", "seed": 3, "ckpt": tiny_ckpt, "weights": "ema_0.99", "ema_std": None}


def write_npz(path, images):
    np.savez(path, arr_0=images)
    return path


@pytest.mark.parametrize(("overrides", "message"), [
    (["num_seeds=0"], "num_seeds=0 must be an integer >= 1"),
    (["num_seeds=2", "metric=nll"], "num_seeds=2 repeats metric=fid's sampling; metric=nll draws no samples"),
    (["num_seeds=2", "samples={ok}"], "num_seeds=2 draws one sample set per seed, but samples=.* pass samples=null"),
    (["feature_extractor=clip"], "feature_extractor='clip' is not one of inception, dinov2"),
    (["samples={wrong_shape}"], "arr_0 is uint8 of shape \\(4, 16, 16, 3\\); expected uint8 NHWC \\(N, 8, 8, 1\\)"),
    (["samples={wrong_dtype}"], "arr_0 is float32 of shape \\(4, 8, 8, 1\\); expected uint8 NHWC"),
    (["samples={too_many}"], "has 1437 images, fewer than the 1500 samples in samples=.*: pass an npz of at most 1437"),
])
def test_bad_sample_sets_and_seeds_write_nothing(compose_cfg, tiny_ckpt, cache_dir, tmp_path, overrides, message):
    files = {
        "ok": write_npz(tmp_path / "ok.npz", np.zeros((4, 8, 8, 1), np.uint8)),
        "wrong_shape": write_npz(tmp_path / "shape.npz", np.zeros((4, 16, 16, 3), np.uint8)),
        "wrong_dtype": write_npz(tmp_path / "dtype.npz", np.zeros((4, 8, 8, 1), np.float32)),
        "too_many": write_npz(tmp_path / "many.npz", np.zeros((1500, 8, 8, 1), np.uint8)),
    }
    cfg = fid_cfg(compose_cfg, tiny_ckpt, tmp_path / "eval", cache_dir, *(o.format(**files) for o in overrides))
    with pytest.raises(ValueError, match=message) as info:  # a ConfigError or an argument check
        evaluate(cfg)
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "eval").glob("*.json")) and not list((tmp_path / "eval").rglob("samples_*"))
