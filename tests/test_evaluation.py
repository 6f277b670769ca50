"""Evaluation layer: the bits/dim loop over a dataset, FID / IS plumbing, digits classifier."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from torch import nn

from diffusion import GaussianDiffusion, SpacedDiffusion, get_named_beta_schedule, space_timesteps
from diffusion.data.digits import digits_images
from diffusion.evaluation.bpd import evaluate_bpd
from diffusion.evaluation.fid import (
    INCEPTION_WEIGHTS_URL,
    DigitsFeatureExtractor,
    FeatureExtractor,
    FIDEvaluator,
    to_uint8_nchw,
)
from diffusion.process.analytic import GaussianDataDenoiser, sample_discretized_gaussian

T = 50
MU, STD = 0.2, 0.3


def make_diffusion(model_var_type="learned_range"):
    return GaussianDiffusion(
        betas=get_named_beta_schedule("linear", T),
        model_mean_type="epsilon",
        model_var_type=model_var_type,
        loss_type="mse",
    )


def data_batches(num_batches=3, batch_size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (sample_discretized_gaussian((batch_size, 1, 2, 2), MU, STD, generator=g),
         torch.full((batch_size,), i, dtype=torch.long))
        for i in range(num_batches)
    ]


# ---------------------------------------------------------------------------- bits/dim
def by_hand(process, model, batches, seed):
    """calc_bpd_loop on each batch with the same noise stream, averaged over images."""
    g = torch.Generator().manual_seed(seed)
    outs = [process.calc_bpd_loop(model, x, generator=g) for x, _ in batches]
    cat = {k: torch.cat([o[k] for o in outs]) for k in ("total_bpd", "prior_bpd", "vb")}
    return cat


def test_evaluate_bpd_is_calc_bpd_loop_averaged_over_images():
    diffusion = make_diffusion()
    model = GaussianDataDenoiser(diffusion, MU, STD)
    batches = data_batches()
    seen, advanced = [], []

    def model_kwargs_fn(labels):
        seen.append(labels.tolist())
        return {}

    result = evaluate_bpd(diffusion, model, batches, model_kwargs_fn=model_kwargs_fn,
                          progress=advanced.append, generator=torch.Generator().manual_seed(5))
    expected = by_hand(diffusion, model, batches, seed=5)
    close = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result["bpd"], expected["total_bpd"].mean().item(), **close)
    torch.testing.assert_close(result["prior_bpd"], expected["prior_bpd"].mean().item(), **close)
    # calc_bpd_loop's column 0 is t = T-1; vb_terms_bpd[i] is step i, so entry 0 is L_0
    vb_by_step = expected["vb"].mean(dim=0).flip(0)
    torch.testing.assert_close(torch.tensor(result["vb_terms_bpd"], dtype=torch.float64), vb_by_step, **close)
    torch.testing.assert_close(result["decoder_bpd"], expected["vb"][:, -1].mean().item(), **close)
    torch.testing.assert_close(result["bpd"], sum(result["vb_terms_bpd"]) + result["prior_bpd"], **close)
    torch.testing.assert_close(result["bpd_sum"], expected["total_bpd"].sum().item(), **close)
    assert result["num_images"] == 24 and result["timesteps"] == list(range(T))
    assert seen == [[0] * 8, [1] * 8, [2] * 8] and advanced == [8, 8, 8]


def test_evaluate_bpd_passes_labels_to_the_model_and_stops_at_max_batches():
    diffusion = make_diffusion("fixed_large")
    inner = GaussianDataDenoiser(diffusion, MU, STD)
    labels_seen = []

    def model(x_t, t, y=None):
        labels_seen.append(int(y[0]))
        return inner(x_t, t)

    result = evaluate_bpd(diffusion, model, data_batches(), max_batches=2,
                          model_kwargs_fn=lambda y: {"y": y})
    assert result["num_images"] == 16
    assert sorted(set(labels_seen)) == [0, 1] and len(labels_seen) == 2 * T


def test_evaluate_bpd_on_a_respaced_process():
    diffusion = make_diffusion()
    model = GaussianDataDenoiser(diffusion, MU, STD)
    batches = data_batches(num_batches=2)
    result = evaluate_bpd(diffusion, model, batches, respacing="4,6",
                          generator=torch.Generator().manual_seed(1))
    kept = sorted(space_timesteps(T, "4,6"))
    spaced = SpacedDiffusion(kept, betas=diffusion.betas, model_mean_type="epsilon",
                             model_var_type="learned_range", loss_type="mse")
    expected = by_hand(spaced, model, batches, seed=1)
    assert result["timesteps"] == kept and len(result["vb_terms_bpd"]) == 10
    torch.testing.assert_close(result["bpd"], expected["total_bpd"].mean().item(), rtol=1e-12, atol=1e-12)


class DeviceBoundNet(nn.Module):
    """The oracle behind a parameter, so that its device is visible (as a UNet's is), and
    refusing inputs from another device as a real network does."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t):
        if x_t.device != self.anchor.device or t.device != self.anchor.device:
            raise RuntimeError(f"inputs on {x_t.device}, network on {self.anchor.device}")
        return self.inner(x_t, t)


def bpd_through_a_closure(device):
    """evaluate_bpd of a closure around a network on ``device`` (as the evaluate job wraps
    the UNet in autocast), with CPU batches, against the network passed directly."""
    diffusion = make_diffusion()
    net = DeviceBoundNet(GaussianDataDenoiser(diffusion, MU, STD)).to(device)
    seen = []

    def closure(x_t, t):  # hides the network's parameters, and so its device
        seen.append(x_t.device)
        return net(x_t, t)

    batches = data_batches(num_batches=2)
    via_closure = evaluate_bpd(diffusion, closure, batches, device=device,
                               generator=torch.Generator().manual_seed(3))
    direct = evaluate_bpd(diffusion, net, batches, generator=torch.Generator().manual_seed(3))
    assert {d.type for d in seen} == {torch.device(device).type} and len(seen) == 2 * T
    return via_closure, direct


def test_evaluate_bpd_moves_batches_to_the_given_device_for_a_closure():
    via_closure, direct = bpd_through_a_closure("cpu")
    assert via_closure == direct  # the same numbers, bit for bit


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_evaluate_bpd_with_a_closure_around_a_cuda_network():
    via_closure, direct = bpd_through_a_closure("cuda")
    assert via_closure == direct
    cpu, _ = bpd_through_a_closure("cpu")  # a CPU generator: the same noise on any device
    torch.testing.assert_close(via_closure["bpd"], cpu["bpd"], rtol=1e-9, atol=0)
    # without device=, a closure's batches stay on the CPU and the network refuses them
    net = DeviceBoundNet(GaussianDataDenoiser(make_diffusion(), MU, STD)).cuda()
    with pytest.raises(RuntimeError, match="inputs on cpu, network on cuda"):
        evaluate_bpd(make_diffusion(), lambda x_t, t: net(x_t, t), data_batches(num_batches=1))


def test_evaluate_bpd_without_images_is_an_error():
    diffusion = make_diffusion()
    with pytest.raises(ValueError, match="no images"):
        evaluate_bpd(diffusion, GaussianDataDenoiser(diffusion, MU, STD), [])


# ------------------------------------------------------------------------------- FID
class PixelFeatures(FeatureExtractor):
    """Features = the pixels / 255 (linear), logits = a fixed 4 -> 3 map: closed forms."""

    name = "pixels-test"
    num_features = 4

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.register_buffer("weight", torch.tensor(
            [[4.0, 0.0, -2.0, 1.0], [0.0, 3.0, 1.0, -1.0], [-1.0, 1.0, 0.0, 2.0]], dtype=torch.float64))

    def forward(self, images):
        self.calls += 1
        return images.double().flatten(1) / 255.0  # (N, 1, 2, 2) -> (N, 4)

    def logits(self, features):
        return features @ self.weight.T


def real_images(n=400, seed=0):
    """uint8 (N, 1, 2, 2) in [20, 200], so a shift by 10 levels never clips."""
    rng = np.random.RandomState(seed)
    return torch.from_numpy(rng.randint(20, 201, size=(n, 1, 2, 2)).astype(np.uint8))


def test_fid_of_a_set_with_itself_is_zero_and_a_shift_gives_its_square(tmp_path):
    real = real_images()
    evaluator = FIDEvaluator(PixelFeatures(), cache_dir=tmp_path, batch_size=64)
    same_as_npz = real.permute(0, 2, 3, 1).numpy()  # NCHW -> NHWC, the sample.py format
    result = evaluator(same_as_npz, dataset="toy", split="train", real_batches=[real[:200], real[200:]])
    assert abs(result["fid"]) < 1e-10 and result["num_samples"] == 400
    # a constant shift of c levels moves μ by c/255 per feature and leaves Σ: FID = d (c/255)²
    result = evaluator(real + 10, dataset="toy", split="train")
    torch.testing.assert_close(result["fid"], 4 * (10 / 255) ** 2, rtol=1e-8, atol=1e-12)
    as_float = real.double() / 127.5 - 1.0  # the data scaling: float NCHW in [-1, 1]
    assert abs(evaluator(as_float, dataset="toy", split="train")["fid"]) < 1e-10


def test_reference_statistics_are_cached_once_and_reused(tmp_path):
    real = real_images()
    made = []

    def real_batches():
        made.append(1)
        return [(real, torch.zeros(len(real)))]

    extractor = PixelFeatures()
    first = FIDEvaluator(extractor, cache_dir=tmp_path).reference_stats("toy", "test", real_batches)
    path = tmp_path / "toy-test-pixels-test.npz"
    assert path.is_file() and first["path"] == str(path) and made == [1] and extractor.calls == 1
    features = real.double().flatten(1).numpy() / 255.0
    np.testing.assert_allclose(first["mu"], features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(first["sigma"], np.cov(features, rowvar=False), rtol=1e-10)

    extractor = PixelFeatures()
    again = FIDEvaluator(extractor, cache_dir=tmp_path)
    second = again.reference_stats("toy", "test", real_batches)
    assert made == [1] and extractor.calls == 0 and second["num_images"] == 400
    np.testing.assert_array_equal(second["sigma"], first["sigma"])
    result = again(real, dataset="toy", split="test", real_batches=real_batches)
    assert made == [1] and abs(result["fid"]) < 1e-10
    with pytest.raises(FileNotFoundError, match="toy-train-pixels-test.npz; pass real_batches"):
        again(real, dataset="toy", split="train")


@pytest.mark.filterwarnings("ignore:std\\(\\)")  # one split has no std
def test_score_is_the_inception_score_formula(tmp_path):
    real, fake = real_images(), real_images(seed=1)
    evaluator = FIDEvaluator(PixelFeatures(), cache_dir=tmp_path, splits=1)
    result = evaluator(fake, dataset="toy", split="train", real_batches=[real])
    # IS = exp(E_x KL(p(y|x) || p(y))) with one split (Salimans et al. 2016, sec. 4)
    p = torch.softmax(PixelFeatures().logits(fake.double().flatten(1) / 255.0), dim=1)
    kl = (p * (p.log() - p.mean(0, keepdim=True).log())).sum(1)
    torch.testing.assert_close(result["inception_score"], math.exp(kl.mean().item()), rtol=1e-6, atol=0)
    assert result["inception_score_std"] == 0.0 or math.isnan(result["inception_score_std"])


def test_image_formats():
    nhwc = np.arange(2 * 3 * 2 * 1, dtype=np.uint8).reshape(2, 3, 2, 1)
    nchw = to_uint8_nchw(nhwc)
    assert nchw.shape == (2, 1, 3, 2) and torch.equal(nchw[:, 0], torch.from_numpy(nhwc[..., 0]))
    levels = torch.arange(256, dtype=torch.uint8).view(4, 1, 8, 8)
    assert torch.equal(to_uint8_nchw(levels.float() / 127.5 - 1), levels)  # exact round trip
    assert torch.equal(to_uint8_nchw(torch.tensor([-3.0, 3.0]).view(1, 2, 1, 1)).flatten(),
                       torch.tensor([0, 255], dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 NHWC numpy"):
        to_uint8_nchw(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="NHWC with 1 or 3 channels"):
        to_uint8_nchw(np.zeros((2, 3, 8, 8), dtype=np.uint8))  # NCHW given as numpy


def test_missing_inception_weights_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        FIDEvaluator(cache_dir=tmp_path)
    message = str(info.value)
    assert INCEPTION_WEIGHTS_URL in message and "inception_weights=" in message
    assert "no inception_weights path was given" in message
    assert INCEPTION_WEIGHTS_URL == (
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
        "weights-inception-2015-12-05-6726825d.pth"
    )
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=f"{missing} does not exist.*{INCEPTION_WEIGHTS_URL}"):
        FIDEvaluator(inception_weights=missing, cache_dir=tmp_path)


@pytest.mark.slow
def test_inception_extractor_runs_from_a_local_weights_file(tmp_path, monkeypatch):
    """The real InceptionV3 wiring, offline: a randomly initialised weights file stands in
    for torch-fidelity's (which this machine cannot download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity
    from torchmetrics.image.fid import NoTrainInceptionV3

    with monkeypatch.context() as patch:  # build an InceptionV3 without any weights
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None)
        torch.manual_seed(0)
        # antialias=False: torch-fidelity's TF1-compatible resize, as the evaluator uses
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], antialias=False)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):  # keep activations alive through 90 layers
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    weights = tmp_path / "weights.pth"
    torch.save(net.state_dict(), weights)

    evaluator = FIDEvaluator(inception_weights=weights, cache_dir=tmp_path, splits=1)
    grayscale = digits_images("test")[0][:3]  # uint8 (3, 1, 8, 8)
    features = evaluator.extractor(grayscale)
    assert features.shape == (3, 2048) and evaluator.extractor.logits(features).shape == (3, 1008)
    expected = net(grayscale.expand(-1, 3, -1, -1))
    torch.testing.assert_close(features, expected)
    # (the FID / IS arithmetic is tested above; a 2048-d FID costs seconds of eigvals here)
    stats = evaluator.reference_stats("digits", "test", real_batches=[grayscale])
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()  # the cache key names the weights file
    assert stats["path"] == str(tmp_path / f"digits-test-inception2015-pool3-{digest[:12]}.npz")
    np.testing.assert_allclose(stats["mu"], expected.double().mean(0).numpy(), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ digits
@pytest.fixture(scope="module")
def digits_extractor(tmp_path_factory):
    cache = tmp_path_factory.mktemp("digits_cache")
    return DigitsFeatureExtractor.load_or_fit(cache, seed=0), cache


@pytest.mark.slow
def test_digits_classifier_is_accurate_and_cached(digits_extractor, monkeypatch):
    extractor, cache = digits_extractor
    assert extractor.test_accuracy > 0.9
    monkeypatch.setattr(DigitsFeatureExtractor, "fit", lambda self: pytest.fail("retrained"))
    loaded = DigitsFeatureExtractor.load_or_fit(cache, seed=0)
    images = digits_images("test")[0][:16]
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), extractor(images), rtol=0, atol=0)
    assert loaded.test_accuracy == extractor.test_accuracy


@pytest.mark.slow
def test_fid_digits_separates_digits_from_noise(digits_extractor):
    extractor, cache = digits_extractor
    evaluator = FIDEvaluator(extractor, cache_dir=cache)
    train, test = digits_images("train")[0], digits_images("test")[0]
    real = evaluator(test, dataset="digits", split="train", real_batches=[train])
    noise = torch.randint(0, 256, test.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    fake = evaluator(noise, dataset="digits", split="train")
    assert set(real) == {"fid_digits", "classifier_score", "classifier_score_std", "num_samples",
                         "classifier_test_accuracy", "precision", "recall", "nearest_k", "kid", "kid_std",
                         "kid_subset_size", "memorisation_share", "memorisation_threshold",
                         "memorisation_pairs"}  # what they were computed from is the evaluate job's to record
    assert real["fid_digits"] * 10 < fake["fid_digits"]
    assert real["precision"] > 0.5 > fake["precision"] and real["kid"] * 10 < fake["kid"]
    assert real["classifier_score"] > 5 > fake["classifier_score"]


def test_digits_splits():
    train, val, test = digits_images("train"), digits_images("val"), digits_images("test")
    assert train[0].shape == (1437, 1, 8, 8) and val[0].shape == test[0].shape == (180, 1, 8, 8)
    assert train[0].dtype == torch.uint8 and int(train[0].max()) == 255
    with pytest.raises(ValueError, match="unknown digits split 'bogus'; valid: train, val, test, all"):
        digits_images("bogus")
