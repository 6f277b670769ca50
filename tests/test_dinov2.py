"""FD-DINOv2's feature extractor: the ViT against hand-written attention, the official
checkpoints' names and shapes, the position-embedding resampling, the preprocessing against
PIL, and the errors for a missing or mismatched weights file."""

from __future__ import annotations

import hashlib
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion.evaluation.fid import (
    DINOV2_WEIGHTS_URL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DINOv2FeatureExtractor,
    FIDEvaluator,
    dinov2_inputs,
)
from diffusion.evaluation.vit import (
    Block,
    interpolate_pos_embed,
    resample_grid,
    vit_from_state_dict,
)
from diffusion.jobs.evaluate import evaluate
from diffusion.utils.errors import ConfigError


def official_state_dict(dim: int, depth: int, *, registers: int = 0, device: str = "cpu", seed: int = 0) -> dict:
    """A state dict with the names and shapes of facebookresearch/dinov2's ``*_pretrain.pth``
    (patch 14, a 37 x 37 position grid, MLP width 4D), random values of a trained network's
    scale; on the meta device, shapes only."""
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + 37 * 37, dim), "mask_token": (1, dim),
              "patch_embed.proj.weight": (dim, 3, 14, 14), "patch_embed.proj.bias": (dim,),
              "norm.weight": (dim,), "norm.bias": (dim,)}
    if registers:
        shapes["register_tokens"] = (1, registers, dim)
    for i in range(depth):
        shapes.update({
            f"blocks.{i}.norm1.weight": (dim,), f"blocks.{i}.norm1.bias": (dim,),
            f"blocks.{i}.attn.qkv.weight": (3 * dim, dim), f"blocks.{i}.attn.qkv.bias": (3 * dim,),
            f"blocks.{i}.attn.proj.weight": (dim, dim), f"blocks.{i}.attn.proj.bias": (dim,),
            f"blocks.{i}.ls1.gamma": (dim,),
            f"blocks.{i}.norm2.weight": (dim,), f"blocks.{i}.norm2.bias": (dim,),
            f"blocks.{i}.mlp.fc1.weight": (4 * dim, dim), f"blocks.{i}.mlp.fc1.bias": (4 * dim,),
            f"blocks.{i}.mlp.fc2.weight": (dim, 4 * dim), f"blocks.{i}.mlp.fc2.bias": (dim,),
            f"blocks.{i}.ls2.gamma": (dim,),
        })
    if device == "meta":
        return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if key.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            state[key] = 1 + 0.1 * noise
        elif key.endswith("gamma"):
            state[key] = 0.3 * noise
        elif key.endswith("weight"):
            state[key] = noise / math.sqrt(math.prod(shape[1:]))  # unit-variance outputs
        else:
            state[key] = 0.1 * noise
    return state


# ----------------------------------------------------------------- the network by hand
def block_by_hand(state: dict, prefix: str, x: torch.Tensor, heads: int) -> torch.Tensor:
    """x + γ₁ Attn(LN₁ x), then + γ₂ MLP(LN₂ x), with each head's softmax(q kᵀ / √d) v
    written out from the qkv weight's rows (q, k, v of all heads in turn, head h at h·d)."""
    w = {key[len(prefix):]: value.to(x.dtype) for key, value in state.items() if key.startswith(prefix)}
    dim = x.shape[-1]
    d = dim // heads
    h = F.layer_norm(x, (dim,), w["norm1.weight"], w["norm1.bias"], eps=1e-6)
    outputs = []
    for head in range(heads):
        rows = [part * dim + head * d + torch.arange(d) for part in range(3)]  # q, k, v rows of this head
        q, k, v = (h @ w["attn.qkv.weight"][r].T + w["attn.qkv.bias"][r] for r in rows)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        outputs.append(weights @ v)
    attention = torch.cat(outputs, dim=-1) @ w["attn.proj.weight"].T + w["attn.proj.bias"]
    x = x + w["ls1.gamma"] * attention
    h = F.layer_norm(x, (dim,), w["norm2.weight"], w["norm2.bias"], eps=1e-6)
    hidden = h @ w["mlp.fc1.weight"].T + w["mlp.fc1.bias"]
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # the exact GELU
    return x + w["ls2.gamma"] * (hidden @ w["mlp.fc2.weight"].T + w["mlp.fc2.bias"])


def vit_by_hand(state: dict, images: torch.Tensor, heads: int, registers: int = 0) -> torch.Tensor:
    """The CLS token of the official forward: [CLS, patches] + positions, registers inserted
    after CLS, the blocks, the final LayerNorm."""
    dim = state["cls_token"].shape[-1]
    patches = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=14)
    grid = tuple(patches.shape[-2:])
    patches = patches.flatten(2).transpose(1, 2)  # (N, D, h, w) -> (N, h·w, D)
    tokens = torch.cat([state["cls_token"].expand(len(images), -1, -1), patches], dim=1)
    tokens = tokens + interpolate_pos_embed(state["pos_embed"], grid, offset=0.0 if registers else 0.1,
                                            antialias=bool(registers))
    if registers:
        tokens = torch.cat([tokens[:, :1], state["register_tokens"].expand(len(images), -1, -1), tokens[:, 1:]], 1)
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    for i in range(depth):
        tokens = block_by_hand(state, f"blocks.{i}.", tokens, heads)
    return F.layer_norm(tokens[:, 0], (dim,), state["norm.weight"], state["norm.bias"], eps=1e-6)


def test_block_is_hand_written_multi_head_attention_and_mlp():
    state = official_state_dict(128, 1)
    block = Block(128, num_heads=2).double()
    block.load_state_dict({key[len("blocks.0."):]: value for key, value in state.items() if key.startswith("blocks.0.")})
    x = torch.randn(3, 7, 128, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(block(x), block_by_hand(state, "blocks.0.", x, heads=2), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("registers", [0, 2])
def test_vit_is_the_official_forward_written_out(registers):
    state = official_state_dict(128, 2, registers=registers)
    model = vit_from_state_dict(state)
    images = torch.randn(2, 3, 56, 42, generator=torch.Generator().manual_seed(2))  # a 4 x 3 patch grid
    assert model.shape.num_heads == 2 and model.shape.variant == f"vit-d128x2p14{f'_reg{registers}' * bool(registers)}"
    torch.testing.assert_close(model(images), vit_by_hand(state, images, heads=2, registers=registers),
                               rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------ the official checkpoints
@pytest.mark.parametrize(("dim", "depth", "heads", "variant"), [(384, 12, 6, "vits14"), (1024, 24, 16, "vitl14")])
def test_official_checkpoint_shapes_are_recognised_without_allocating(dim, depth, heads, variant):
    state = official_state_dict(dim, depth, device="meta")
    model = vit_from_state_dict(state)  # meta tensors in, a meta network out
    assert (model.shape.dim, model.shape.depth, model.shape.num_heads) == (dim, depth, heads)
    assert model.shape.patch_size == 14 and model.shape.pos_grid == 37 and model.shape.variant == variant
    assert all(p.is_meta for p in model.parameters())
    assert set(model.state_dict()) == set(state)
    if variant == "vits14":  # dinov2_vits14's published size
        assert sum(p.numel() for p in model.parameters()) == 22_056_576
    registered = vit_from_state_dict(official_state_dict(dim, depth, registers=4, device="meta"))
    assert registered.shape.variant == f"{variant}_reg4"
    # the "_reg" checkpoints' hub entries resample positions to the grid size, antialiased
    assert registered.interpolation == {"offset": 0.0, "antialias": True}
    assert model.interpolation == {"offset": 0.1, "antialias": False}


# ------------------------------------------------------------- position embeddings
def test_position_embeddings_resample_to_the_patch_grid():
    pos = torch.randn(1, 1 + 37 * 37, 8, generator=torch.Generator().manual_seed(3))
    assert interpolate_pos_embed(pos, (37, 37)) is pos  # the trained grid: as it is
    patch = torch.randn(1, 25, 8, generator=torch.Generator().manual_seed(4))  # a 5 x 5 grid
    for antialias in (False, True):  # resampling onto its own grid is the identity
        torch.testing.assert_close(resample_grid(patch, (5, 5), offset=0.0, antialias=antialias), patch,
                                   rtol=1e-6, atol=1e-6)
    # rows stay rows: an embedding that varies down the grid only still does, on a 3 x 7 grid
    rows = torch.arange(37.0).repeat_interleave(37).view(1, 37 * 37, 1).expand(-1, -1, 4)
    for offset in (0.0, 0.1):
        out = resample_grid(rows, (3, 7), offset=offset, antialias=False).view(3, 7, 4)
        torch.testing.assert_close(out, out[:, :1].expand(-1, 7, -1))
        assert out[0, 0, 0] < out[1, 0, 0] < out[2, 0, 0]
    full = interpolate_pos_embed(pos, (16, 16))
    assert full.shape == (1, 1 + 16 * 16, 8) and torch.equal(full[:, 0], pos[:, 0])  # CLS kept


# ------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("size", [8, 30, 300])
def test_inputs_are_pil_bicubic_resized_and_imagenet_normalised(size):
    """FD-DINOv2's preprocessing: PIL's bicubic resize of the 8-bit image to 224 x 224, /255,
    the ImageNet mean and std. PIL computes in fixed point: about one pixel in 2000 rounds to
    the next level (rarely two)."""
    pixels = np.random.RandomState(size).randint(0, 256, (size, size, 3)).astype(np.uint8)
    expected = np.asarray(Image.fromarray(pixels).resize((224, 224), Image.BICUBIC), dtype=np.float64) / 255
    expected = (expected - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)  # (224, 224, 3)
    got = dinov2_inputs(torch.from_numpy(pixels).permute(2, 0, 1)[None])[0].permute(1, 2, 0).double().numpy()
    error_in_levels = np.abs(got - expected) * np.array(IMAGENET_STD) * 255
    assert error_in_levels.max() < 2 + 1e-4 and (error_in_levels > 0.5).mean() < 1e-3


# --------------------------------------------------------------- the extractor
@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov2") / "tiny_dinov2.pth"
    torch.save(official_state_dict(64, 1), path)
    return path


def test_extractor_loads_a_checkpoint_file_and_is_deterministic(tiny_weights):
    extractor = DINOv2FeatureExtractor(tiny_weights)
    assert extractor.num_features == 64 and extractor.name == "dinov2-vit-d64x1p14"
    assert extractor.weights_sha256 == hashlib.sha256(tiny_weights.read_bytes()).hexdigest()
    assert extractor.fid_key == "fd_dinov2" and extractor.score_key is None
    images = torch.randint(0, 256, (3, 3, 8, 8), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    with torch.no_grad():
        features = extractor(images)
        assert features.shape == (3, 64) and torch.isfinite(features).all()
        assert torch.equal(extractor(images), features)
        assert torch.equal(DINOv2FeatureExtractor(tiny_weights)(images), features)  # a second load
        grey = images[:, :1]
        assert torch.equal(extractor(grey), extractor(grey.expand(-1, 3, -1, -1)))
        # the final-normed CLS token of the preprocessed images
        state = torch.load(tiny_weights, weights_only=True)
        torch.testing.assert_close(features, vit_by_hand(state, dinov2_inputs(images), heads=1), rtol=1e-4, atol=1e-4)


def test_evaluator_reports_fd_dinov2_without_a_score(tiny_weights, tmp_path):
    """No classifier, no score; the reference cache is keyed by the weights' hash too."""
    extractor = DINOv2FeatureExtractor(tiny_weights)
    extractor.input_size = 28  # a 2 x 2 patch grid: the arithmetic, not the resolution, is tested here
    evaluator = FIDEvaluator(extractor, cache_dir=tmp_path, kid_subset_size=8)
    generator = torch.Generator().manual_seed(6)
    real = torch.randint(0, 256, (12, 1, 8, 8), generator=generator, dtype=torch.uint8)
    result = evaluator(real, dataset="toy", split="train", real_batches=[real])
    assert abs(result["fd_dinov2"]) < 1e-4 and result["num_samples"] == 12  # the set against itself
    assert not {key for key in result if "score" in key} and "score" not in " ".join(evaluator.metric_keys)
    assert (tmp_path / f"toy-train-dinov2-vit-d64x1p14-{extractor.weights_sha256[:12]}.npz").is_file()


def test_missing_weights_say_what_to_download(tmp_path):
    missing = tmp_path / "nope.pth"
    for given, named in ((None, "dinov2_weights is not set"), (missing, f"dinov2_weights={missing} does not exist")):
        with pytest.raises(ConfigError) as info:
            DINOv2FeatureExtractor(given)
        message = str(info.value)
        assert message.startswith(named) and DINOV2_WEIGHTS_URL in message and "\n" not in message
    assert DINOV2_WEIGHTS_URL == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"


def save(state, path):
    torch.save(state, path)
    return path


def test_a_file_of_other_keys_or_shapes_names_the_first_difference(tmp_path):
    state = official_state_dict(64, 2)
    without = {k: v for k, v in state.items() if k != "blocks.1.attn.qkv.weight"}
    cases = {
        "missing": (without, "missing key blocks.1.attn.qkv.weight"),
        "unexpected": ({**state, "head.weight": torch.zeros(10, 64)}, "unexpected key head.weight"),
        "shape": ({**state, "blocks.0.mlp.fc1.weight": torch.zeros(3 * 64, 64)},
                  "key blocks.0.mlp.fc1.weight has shape (192, 64), expected (256, 64)"),
        "not a state dict": ({"model": state}, "it holds a dict"),
    }
    for name, (bad, message) in cases.items():
        path = save(bad, tmp_path / f"{name}.pth")
        with pytest.raises(ConfigError, match=f"^{re.escape(f'dinov2_weights={path}: ')}.*{re.escape(message)}") as info:
            DINOv2FeatureExtractor(path)
        assert "\n" not in str(info.value), name
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=f"dinov2_weights={text} is not a readable checkpoint"):
        DINOv2FeatureExtractor(text)


# ------------------------------------------------------------------- the evaluate job
def test_evaluate_fid_with_dinov2_features(compose_cfg, tiny_ckpt, tiny_weights, tmp_path, monkeypatch):
    monkeypatch.setattr(DINOv2FeatureExtractor, "input_size", 28)  # 1437 reference digits at 2 x 2 patches
    cfg = compose_cfg("evaluate", [f"ckpt={tiny_ckpt}", "metric=fid", "sampler=ddim10", "num_samples=20",
                                   "batch_size=20", "progress=false", f"cache_dir={tmp_path / 'cache'}",
                                   "feature_extractor=dinov2", f"dinov2_weights={tiny_weights}", "kid_subsets=5"],
                      output_dir=tmp_path / "eval")
    evaluate(cfg)
    written = json.loads((tmp_path / "eval" / "fid.json").read_text())
    assert written["fd_dinov2"] > 0 and written["num_samples"] == 20 and "fid_digits" not in written
    assert not [key for key in written if "score" in key]
    assert written["feature_extractor"] == "dinov2-vit-d64x1p14"
    assert written["feature_extractor_sha256"] == hashlib.sha256(tiny_weights.read_bytes()).hexdigest()
    assert written["reference"] == {"dataset": "digits", "split": "train", "num_images": 1437}


def test_evaluate_without_dinov2_weights_writes_nothing(compose_cfg, tiny_ckpt, tmp_path):
    cfg = compose_cfg("evaluate", [f"ckpt={tiny_ckpt}", "metric=fid", "sampler=ddim10", "num_samples=20",
                                   "progress=false", f"cache_dir={tmp_path / 'cache'}", "feature_extractor=dinov2",
                                   f"dinov2_weights={tmp_path / 'missing.pth'}"], output_dir=tmp_path / "eval")
    with pytest.raises(ConfigError, match=f"dinov2_weights={tmp_path / 'missing.pth'} does not exist.*dinov2_vits14"):
        evaluate(cfg)
    assert not list((tmp_path / "eval").glob("*.json")) and not list((tmp_path / "eval").glob("samples_*"))
