"""FID and Inception Score of samples, through torchmetrics, with no network access.

FID (Heusel et al. 2017, arXiv 1706.08500, eq. in sec. 3):
    d² = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^{1/2})
between Gaussians fitted to features of real (r) and generated (g) images; IS (Salimans et
al. 2016, arXiv 1606.03498, sec. 4): exp E_x KL(p(y|x) ‖ p(y)). The statistics and both
formulas are torchmetrics' ``FrechetInceptionDistance`` and ``InceptionScore``; we run the
feature network once per batch and hand both metrics its output.

Feature extractors:

* ``InceptionFeatureExtractor``: torch-fidelity's InceptionV3 (the 2015-12-05 TF weights that
  published FIDs use) as torchmetrics wraps it, pool3 (2048) features for FID and the
  unbiased logits for IS, with the weights read from a local file (``inception_weights=``;
  see ``INCEPTION_WEIGHTS_URL``). Images are resized to 299 with torch-fidelity's
  TF1-compatible bilinear resize (``antialias=False``), so numbers are comparable with
  published ones; torchmetrics' own default (antialias=True) differs slightly.
* ``DigitsFeatureExtractor``: for the 8x8 digits quickstart, where Inception does not apply.
  FID_digits is the Fréchet distance in the 64 penultimate features of a small CNN trained
  on the digits, and the "classifier score" is IS with its class probabilities (at most 10).
  FID_digits is NOT comparable to Inception FID.
* ``DINOv2FeatureExtractor``: FD-DINOv2 (Stein et al. 2023, arXiv 2306.04675), the Fréchet
  distance in the final-normed CLS token of DINOv2 (384 dims for ViT-S/14, 1024 for ViT-L/14;
  `diffusion.evaluation.vit`) read from an official checkpoint file (``dinov2_weights=``; see
  ``DINOV2_WEIGHTS_URL``), on images prepared as their dgm-eval code does. It has no
  classifier, so it reports no score (``score_key = None``).

Reference statistics (μ_r, Σ_r) and the reference features themselves (for precision/recall,
KID and the memorisation audit, `diffusion.evaluation.neighbours`) are computed once per
(dataset, split, extractor, extractor weights) and kept in
``cache_dir/<dataset>-<split>-<extractor>[-<weights sha256, 12 digits>].npz`` (keys ``mu``,
``sigma``, ``num_images``, ``features``); delete the file to recompute. A file of an older
version without ``features`` is recomputed. Nothing here prints; results are plain dicts.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.inception import InceptionScore

from diffusion.data.digits import digits_images
from diffusion.evaluation.neighbours import (
    _Given,
    kernel_inception_distance,
    memorisation_audit,
    precision_recall,
)
from diffusion.evaluation.vit import vit_from_state_dict
from diffusion.process._tensor import model_device
from diffusion.utils.atomic import atomic_savez, atomic_write
from diffusion.utils.errors import ConfigError
from diffusion.utils.images import to_uint8

INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
# The smallest official DINOv2 checkpoint; dinov2_vitl14/dinov2_vitl14_pretrain.pth (FD-DINOv2's
# ViT-L/14) sits beside it under the same name pattern.
DINOV2_WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CACHE_DIR = Path("~/.cache/diffusion/fid")


# ------------------------------------------------------------------------ image formats
def to_uint8_nchw(images) -> torch.Tensor:
    """Images as a uint8 (N, C, H, W) tensor.

    Accepts uint8 numpy arrays (N, H, W, C) or (N, H, W), as sample.py writes them into
    ``arr_0`` of an npz; uint8 tensors (N, C, H, W); float arrays or tensors (N, C, H, W) in
    [-1, 1], quantized as x ↦ round(127.5 (x + 1)), the inverse of the data scaling.
    """
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8:
            array = images[..., None] if images.ndim == 3 else images  # (N,H,W) -> (N,H,W,1)
            if array.ndim != 4 or array.shape[-1] not in (1, 3):
                raise ValueError(f"uint8 numpy images must be NHWC with 1 or 3 channels, got {images.shape}")
            return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)  # NHWC -> NCHW
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(
            f"images must be uint8 NHWC numpy, uint8 NCHW or float NCHW in [-1, 1], got "
            f"{type(images).__name__} of shape {getattr(images, 'shape', None)}"
        )
    if images.dtype == torch.uint8:
        return images
    return to_uint8(images)


def iter_uint8_batches(samples, batch_size: int):
    """Yield uint8 NCHW batches from an npz path (``arr_0``), an array/tensor of images,
    an iterable of such batches, or of ``(images, labels)`` pairs from a DataLoader."""
    if isinstance(samples, (str, os.PathLike)):
        with np.load(samples) as data:
            samples = data["arr_0"]
    if isinstance(samples, (np.ndarray, torch.Tensor)):
        images = to_uint8_nchw(samples)
        yield from images.split(batch_size)
        return
    for batch in samples:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        yield to_uint8_nchw(images)


# ------------------------------------------------------------------- feature extractors
class FeatureExtractor(nn.Module):
    """What ``FIDEvaluator`` needs: features for FID and, where there is a classifier, class
    logits for the score.

    Subclasses set ``name`` and ``weights_sha256`` (the SHA-256 of the weights file, None
    when there is none; both are in the reference-statistics cache key and the result's
    protocol), ``num_features``, and the result keys ``fid_key`` and ``score_key``;
    ``score_key = None``: no classifier, no score, and ``logits`` is never called.
    """

    name: str = "features"
    weights_sha256: str | None = None
    num_features: int = 0
    fid_key: str = "fid"
    score_key: str | None = "inception_score"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> float (N, num_features)."""
        raise NotImplementedError

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, num_features) -> (N, num_classes) class logits (when ``score_key`` is set)."""
        raise NotImplementedError

    def extra_results(self) -> dict:
        """Constant numbers to report next to the metrics (sanity checks)."""
        return {}


def file_sha256(path) -> str:
    """The SHA-256 of a file's bytes (read in chunks: a ViT-L checkpoint is 1.2 GB)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def existing_file(path) -> Path | None:
    """``path`` (``~`` expanded) when it names a file, else None (also for None)."""
    found = None if path is None else Path(path).expanduser()
    return found if found is not None and found.is_file() else None


def check_inception_weights(path) -> Path:
    """The weights file, or a FileNotFoundError that says where to get it."""
    if found := existing_file(path):
        return found
    where = "no inception_weights path was given" if path is None else f"{path} does not exist"
    raise FileNotFoundError(
        f"Inception weights not found ({where}). FID/IS use torch-fidelity's InceptionV3 "
        f"weights (the 2015-12-05 TensorFlow FID Inception, converted), which are never "
        f"downloaded here: fetch {INCEPTION_WEIGHTS_URL} on a machine with internet access "
        f"(torch-fidelity keeps it in ~/.cache/torch/hub/checkpoints/) and pass "
        f"inception_weights=/path/to/weights-inception-2015-12-05-6726825d.pth"
    )


class InceptionFeatureExtractor(FeatureExtractor):
    """torchmetrics' InceptionV3 (torch-fidelity's FeatureExtractorInceptionV3) loaded from
    ``weights_path``: pool3 features (2048) and torch-fidelity's unbiased logits (1008)."""

    num_features = 2048
    fid_key = "fid"
    score_key = "inception_score"

    def __init__(self, weights_path, antialias: bool = False):
        super().__init__()
        weights_path = check_inception_weights(weights_path)
        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(self.num_features)],
            feature_extractor_weights_path=str(weights_path),
            antialias=antialias,
        )
        self.name = "inception2015-pool3" + ("-antialias" if antialias else "")
        self.weights_sha256 = file_sha256(weights_path)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)  # grayscale (N,1,H,W) -> (N,3,H,W)
        return self.net(images)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        # torch-fidelity's "logits_unbiased": the final layer without its bias, which is
        # torchmetrics' default input to InceptionScore.
        return F.linear(features, self.net.fc.weight.to(features.dtype))


class DigitsFeatureExtractor(FeatureExtractor):
    """A small CNN classifier of the 8x8 digits; its 64 penultimate features give FID_digits
    and its class probabilities the classifier score. Build with ``load_or_fit``.

    FID_digits: Fréchet distance in the features of a digits classifier; not comparable to
    Inception FID.
    """

    num_features = 64
    fid_key = "fid_digits"
    score_key = "classifier_score"
    # Bump when the architecture, the training or the digits split changes: it renames the
    # caches (v2: trained on `diffusion.data.digits`' split, the quickstart's own).
    version = 2

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed
        self.name = f"digits-cnn-v{self.version}-seed{seed}"
        self.test_accuracy = float("nan")
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # (N, 32, 8, 8) -> (N, 32, 4, 4)
            nn.Flatten(),  # (N, 32, 4, 4) -> (N, 512)
            nn.Linear(512, self.num_features), nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images.float() / 127.5 - 1.0)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features.to(self.head.weight.dtype))

    def extra_results(self) -> dict:
        return {"classifier_test_accuracy": self.test_accuracy}

    @classmethod
    def load_or_fit(cls, cache_dir=DEFAULT_CACHE_DIR, seed: int = 0) -> DigitsFeatureExtractor:
        """The classifier from ``cache_dir``, or trained (a few seconds on a CPU) and saved."""
        model = cls(seed)
        path = Path(cache_dir).expanduser() / f"{model.name}.pt"
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state["state_dict"])
            model.test_accuracy = float(state["test_accuracy"])
        else:
            model.fit()
            with atomic_write(str(path)) as handle:
                torch.save({"state_dict": model.state_dict(), "test_accuracy": model.test_accuracy}, handle)
        model.weights_sha256 = file_sha256(path)  # the weights file is the cache file
        return model.eval()

    def fit(self, epochs: int = 8, batch_size: int = 128, lr: float = 5e-3) -> float:
        """Train on the train split (deterministic given the seed); return test accuracy."""
        images, labels = digits_images("train")
        generator = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for module in self.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()  # seeded initialization
        optimizer = torch.optim.Adam(self.parameters(), lr=lr)
        self.train()
        for _ in range(epochs):
            for index in torch.randperm(len(images), generator=generator).split(batch_size):
                loss = F.cross_entropy(self.logits(self(images[index])), labels[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        self.eval()
        test_images, test_labels = digits_images("test")
        with torch.no_grad():
            predicted = self.logits(self(test_images)).argmax(dim=1)
        self.test_accuracy = float((predicted == test_labels).float().mean())
        return self.test_accuracy


def check_dinov2_weights(path) -> Path:
    """The DINOv2 checkpoint file, or a ConfigError that says where to get it."""
    if found := existing_file(path):
        return found
    where = " is not set" if path is None else f"={path} does not exist"
    raise ConfigError(
        f"dinov2_weights{where}: feature_extractor=dinov2 reads an official DINOv2 checkpoint, never "
        f"downloaded here: fetch {DINOV2_WEIGHTS_URL} (or dinov2_vitl14_pretrain.pth, FD-DINOv2's ViT-L/14) "
        f"on a machine with internet access and pass dinov2_weights=/path/to/that/file"
    )


def dinov2_inputs(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """uint8 (N, C, H, W) -> DINOv2's input (N, 3, size, size), prepared as FD-DINOv2's code
    (dgm-eval) prepares an image: torchvision's bicubic Resize((224, 224)) of the 8-bit PIL
    image, ToTensor ([0, 1]) and the ImageNet mean and std. PIL's resize is done here in two
    antialiased bicubic passes (its a = -0.5 kernel, which torch's antialiased bicubic uses
    too), width then height, each rounded to 8 bits as PIL stores it; PIL computes in fixed
    point, so about one pixel in 2000 differs from PIL's by a level (rarely two). Grey images
    are repeated to three channels."""
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # grey (N, 1, H, W) -> (N, 3, H, W)
    for pass_size in ((x.shape[2], size), (size, size)):  # PIL: horizontal pass, then vertical
        x = F.interpolate(x, size=pass_size, mode="bicubic", antialias=True).clamp(0, 255).round()
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x / 255 - mean) / std


class DINOv2FeatureExtractor(FeatureExtractor):
    """DINOv2's final-normed CLS token (`diffusion.evaluation.vit`), the features of
    FD-DINOv2, from an official checkpoint file; no classifier, so no score."""

    fid_key = "fd_dinov2"
    score_key = None
    input_size = 224  # FD-DINOv2's resize (the patch grid is 16 x 16 for patch size 14)

    def __init__(self, weights_path):
        super().__init__()
        path = check_dinov2_weights(weights_path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:  # not a torch file
            raise ConfigError(f"dinov2_weights={path} is not a readable checkpoint "
                              f"({' '.join(str(err).split())[:200]})") from None
        try:
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ValueError(f"it holds a {type(state).__name__}, not a state dict of tensors")
            self.vit = vit_from_state_dict(state)
        except ValueError as err:
            raise ConfigError(f"dinov2_weights={path}: {err}") from None
        self.num_features = self.vit.shape.dim
        self.name = f"dinov2-{self.vit.shape.variant}"
        self.weights_sha256 = file_sha256(path)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit(dinov2_inputs(images, self.input_size))


# --------------------------------------------------------------------------- evaluator
class FIDEvaluator:
    """FID and Inception Score (or their digits and DINOv2 analogues) of samples against a dataset.

    Args:
        feature_extractor: a ``FeatureExtractor``; None builds ``InceptionFeatureExtractor``
            from ``inception_weights``.
        inception_weights: path to torch-fidelity's Inception weights file.
        cache_dir: where reference statistics are kept.
        device: where the feature network runs (default: where its parameters are).
        batch_size: images per forward pass.
        splits: the Inception Score's number of splits (10 in Salimans et al.).
        seed: seed of the Inception Score's random split and of KID's subsets (so results
            repeat); a call may pass another.
        nearest_k: k of precision/recall (3 in Kynkäänniemi et al.).
        kid_subsets, kid_subset_size: KID's subsets (100 of 1000 in Bińkowski et al.).
        memorisation_threshold: the ratio below which a sample counts as a near-copy.
        memorisation_pairs: how many of the closest (sample, training) pairs to report.
    """

    def __init__(self, feature_extractor: FeatureExtractor | None = None, *,
                 inception_weights=None, cache_dir=DEFAULT_CACHE_DIR, device=None,
                 batch_size: int = 250, splits: int = 10, seed: int = 0, nearest_k: int = 3,
                 kid_subsets: int = 100, kid_subset_size: int = 1000,
                 memorisation_threshold: float = 1 / 3, memorisation_pairs: int = 16):
        if feature_extractor is None:
            feature_extractor = InceptionFeatureExtractor(inception_weights)
        if device is not None:
            feature_extractor = feature_extractor.to(device)
        self.extractor = feature_extractor.eval()
        self.cache_dir = Path(cache_dir).expanduser()
        self.batch_size = batch_size
        self.splits = splits
        self.seed = seed
        self.nearest_k = nearest_k
        self.kid = {"subsets": kid_subsets, "subset_size": kid_subset_size}
        self.memorisation_threshold = memorisation_threshold
        self.memorisation_pairs = memorisation_pairs

    def cache_path(self, dataset: str, split: str) -> Path:
        """The cache key: the images (dataset, split), the extractor and its weights."""
        name, weights = self.extractor.name, self.extractor.weights_sha256
        extractor = f"{name}-{weights[:12]}" if weights else name
        return self.cache_dir / f"{dataset}-{split}-{extractor}.npz"

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """The scalar results that measure the samples (which another sample set changes), as
        opposed to the settings and constants beside them in a result."""
        score = self.extractor.score_key
        scores = (score, f"{score}_std") if score else ()
        return (self.extractor.fid_key, *scores, "precision", "recall", "kid", "kid_std", "memorisation_share")

    @torch.no_grad()
    def _features(self, samples) -> Iterable[torch.Tensor]:
        """Float64 features on the CPU, one batch at a time."""
        device = model_device(self.extractor) or torch.device("cpu")
        for images in iter_uint8_batches(samples, self.batch_size):
            yield self.extractor(images.to(device)).to("cpu", torch.float64)

    def reference_stats(self, dataset: str, split: str,
                        real_batches: Iterable | Callable[[], Iterable] | None = None) -> dict:
        """μ_r, Σ_r and the features (float32, in order) of the real images, read from the
        cache or computed and cached.

        ``real_batches`` (anything ``iter_uint8_batches`` takes, or a zero-argument callable
        returning it, so that no DataLoader is built when the cache already has the file)
        is only used when the cache has no entry.
        """
        path = self.cache_path(dataset, split)
        if path.is_file():
            with np.load(path) as data:
                if "features" in data.files:  # else a cache from before the features were kept
                    return {"mu": data["mu"], "sigma": data["sigma"], "features": data["features"],
                            "num_images": int(data["num_images"]), "path": str(path)}
        if real_batches is None:
            raise FileNotFoundError(
                f"no reference statistics at {path}; pass real_batches (the {dataset} "
                f"{split} images) once to compute them"
            )
        if callable(real_batches):
            real_batches = real_batches()
        metric = self._new_fid()
        kept = []
        for features in self._features(real_batches):
            metric.update(features, real=True)
            kept.append(features.float())
        n = int(metric.real_features_num_samples)
        if n < 2:
            raise ValueError(f"reference statistics need at least 2 real images, got {n}")
        mu = metric.real_features_sum / n
        # The unbiased covariance exactly as torchmetrics' compute() forms it.
        sigma = (metric.real_features_cov_sum - n * torch.outer(mu, mu)) / (n - 1)
        stats = {"mu": mu.numpy(), "sigma": sigma.numpy(), "num_images": n, "features": torch.cat(kept).numpy()}
        atomic_savez(str(path), extractor=self.extractor.name, weights_sha256=str(self.extractor.weights_sha256),
                     **stats)
        return {**stats, "path": str(path)}

    def _new_fid(self) -> FrechetInceptionDistance:
        return FrechetInceptionDistance(
            feature=_Given(self.extractor.num_features), reset_real_features=False
        )

    @torch.no_grad()
    def __call__(self, samples, *, dataset: str, split: str = "train",
                 real_batches: Iterable | Callable[[], Iterable] | None = None, seed: int | None = None) -> dict:
        """Scores of ``samples`` (see ``iter_uint8_batches``) against ``dataset``/``split``;
        ``seed`` (default: the evaluator's) draws the score's split and KID's subsets.

        Returns ``{fid_key, score_key, score_key + "_std", "num_samples", ...}``; for the
        Inception extractor ``fid``/``inception_score``, for the digits one ``fid_digits``/
        ``classifier_score`` plus ``classifier_test_accuracy``, for DINOv2 ``fd_dinov2`` and no
        score; and, on the same features, ``precision``, ``recall``, ``kid``, ``kid_std``,
        ``memorisation_share`` and ``memorisation_pairs`` (`neighbour_metrics`). What they were
        computed from (extractor, reference set, ...) is the caller's to record.
        """
        seed = self.seed if seed is None else seed
        ref = self.reference_stats(dataset, split, real_batches)
        fid = self._new_fid()
        _load_real_stats(fid, ref)
        kept = []
        for features in self._features(samples):
            fid.update(features, real=False)
            kept.append(features)
        features = torch.cat(kept)
        return {
            self.extractor.fid_key: float(fid.compute()),
            **self.score(features, seed),
            "num_samples": int(fid.fake_features_num_samples),
            **self.extractor.extra_results(),
            **self.neighbour_metrics(torch.as_tensor(ref["features"]), features, seed),
        }

    def score(self, features: torch.Tensor, seed: int) -> dict:
        """The Inception Score (or its classifier analogue) of the samples' features, with its
        std over ``splits``; nothing for an extractor without a classifier."""
        key = self.extractor.score_key
        if key is None:
            return {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            score = InceptionScore(feature=_Given(0), splits=self.splits)
        device = model_device(self.extractor) or torch.device("cpu")
        for batch in features.split(self.batch_size):  # the features are on the CPU, the classifier maybe not
            score.update(self.extractor.logits(batch.to(device)).cpu())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # InceptionScore shuffles with the global RNG
            score_mean, score_std = score.compute()
        return {key: float(score_mean), f"{key}_std": float(score_std)}

    def neighbour_metrics(self, real: torch.Tensor, fake: torch.Tensor, seed: int | None = None) -> dict:
        """Precision/recall, KID (subsets drawn with ``seed``, default the evaluator's) and the
        memorisation audit of ``fake`` against ``real`` features (the reference set stands for
        the training set in the audit)."""
        device = model_device(self.extractor) or torch.device("cpu")
        real, fake = real.to(device, torch.float64), fake.to(device, torch.float64)
        audit = memorisation_audit(fake, real, self.memorisation_threshold)
        return {
            **precision_recall(real, fake, self.nearest_k),
            "nearest_k": self.nearest_k,
            **kernel_inception_distance(real, fake, **self.kid, seed=self.seed if seed is None else seed),
            "memorisation_share": audit.share,
            "memorisation_threshold": audit.threshold,
            # [sample index, reference index, ratio], closest first: memorisation.png's pairs
            "memorisation_pairs": [list(pair) for pair in audit.closest(self.memorisation_pairs)],
        }


def _load_real_stats(metric: FrechetInceptionDistance, ref: dict) -> None:
    """Set the metric's running sums so that its compute() sees μ_r and Σ_r."""
    n = int(ref["num_images"])
    mu = torch.as_tensor(ref["mu"], dtype=torch.float64)
    sigma = torch.as_tensor(ref["sigma"], dtype=torch.float64)
    metric.real_features_sum = mu * n
    metric.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
    metric.real_features_num_samples = torch.tensor(n, dtype=torch.long)
