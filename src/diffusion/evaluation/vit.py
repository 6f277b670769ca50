"""A Vision Transformer whose parameter names are those of the official DINOv2 checkpoints.

DINOv2 (Oquab et al. 2023, arXiv 2304.07193) is a ViT (Dosovitskiy et al. 2020, arXiv
2010.11929) with LayerScale (Touvron et al. 2021, arXiv 2103.17239). FD-DINOv2 (Stein et al.
2023, arXiv 2306.04675) is the Fréchet distance in its final-normed CLS token. This module
builds the network from a state dict of facebookresearch/dinov2's ``dinov2_vit{s,b,l}14``
(``_reg4``) ``_pretrain.pth`` files, with the checkpoint's own names:

    cls_token (1, 1, D)            pos_embed (1, 1 + 37², D)       mask_token (1, D)
    register_tokens (1, R, D)      (the "_reg" checkpoints only)
    patch_embed.proj.{weight (D, 3, 14, 14), bias}
    blocks.{i}.norm1 / attn.qkv (3D, D) / attn.proj / ls1.gamma / norm2 / mlp.fc1 (4D, D) /
        mlp.fc2 / ls2.gamma        norm.{weight, bias}

Token x of block i (pre-norm, LayerNorm ε = 1e-6, GELU MLP of width 4D):
    x ← x + γ₁ ⊙ Attn(LN₁(x)),    x ← x + γ₂ ⊙ MLP(LN₂(x)),
    Attn = softmax(Q Kᵀ / √d) V per head of width d = 64 (every DINOv2 variant: ViT-S/14 has
    D = 384 and 6 heads, ViT-B/14 768 and 12, ViT-L/14 1024 and 16).

The variant is read off the shapes (`infer_shape`); the network is built on the meta device
and takes the state dict's tensors as its parameters, so nothing is allocated twice.
``mask_token`` is only used in DINOv2's masked training; it is kept so that the keys match.
ViT-g/14 (a SwiGLU MLP) is not supported: its keys are reported as unexpected.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

HEAD_WIDTH = 64  # d, the same in every DINOv2 variant
LAYER_NORM_EPS = 1e-6
MLP_RATIO = 4
VARIANTS = {384: "vits", 768: "vitb", 1024: "vitl"}  # D -> the checkpoints' architecture name
# How the official code resamples pos_embed to another patch grid (dinov2/models/
# vision_transformer.py, interpolate_pos_encoding): the plain checkpoints with a scale factor
# of (g + 0.1) / 37 instead of the output size g, and no antialiasing; the "_reg" ones with
# the size g and antialiasing (their hub entries pass interpolate_offset=0, antialias=True).
INTERPOLATION = {False: {"offset": 0.1, "antialias": False}, True: {"offset": 0.0, "antialias": True}}


@dataclass(frozen=True)
class ViTShape:
    """What a checkpoint's tensor shapes say about its network."""

    dim: int  # D, the token width
    depth: int  # the number of blocks
    patch_size: int
    pos_grid: int  # the side of the grid pos_embed was trained on (37 = 518 / 14)
    num_registers: int = 0

    @property
    def num_heads(self) -> int:
        return self.dim // HEAD_WIDTH

    @property
    def variant(self) -> str:
        """``vits14``, ``vitl14_reg4``, ...; ``vit-d<D>x<depth>p<patch>`` for other widths."""
        name = VARIANTS.get(self.dim, f"vit-d{self.dim}x{self.depth}p")
        registers = f"_reg{self.num_registers}" if self.num_registers else ""
        return f"{name}{self.patch_size}{registers}"


def infer_shape(shapes: Mapping[str, Sequence[int]]) -> ViTShape:
    """The `ViTShape` of a state dict given as its tensors' shapes; a ValueError naming a
    missing key or an impossible shape."""

    def shape_of(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ValueError(f"missing key {key}")
        return tuple(shapes[key])

    dim = shape_of("cls_token")[-1]
    if dim % HEAD_WIDTH:
        raise ValueError(f"cls_token has width {dim}, not a multiple of DINOv2's head width {HEAD_WIDTH}")
    blocks = {int(m.group(1)) for key in shapes if (m := re.match(r"blocks\.(\d+)\.", key))}
    if not blocks:
        raise ValueError("missing key blocks.0.attn.qkv.weight (no transformer blocks)")
    patch_size = shape_of("patch_embed.proj.weight")[-1]
    num_positions = shape_of("pos_embed")[1] - 1
    pos_grid = math.isqrt(num_positions)
    if pos_grid * pos_grid != num_positions:
        raise ValueError(f"pos_embed holds {num_positions} patch positions, not a square grid")
    registers = shapes["register_tokens"][1] if "register_tokens" in shapes else 0
    return ViTShape(dim=dim, depth=max(blocks) + 1, patch_size=patch_size, pos_grid=pos_grid,
                    num_registers=registers)


class LayerScale(nn.Module):
    """x ↦ γ ⊙ x (CaiT, arXiv 2103.17239, sec. 2.1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention, softmax(Q Kᵀ / √d) V per head, through SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads)  # (B, L, 3D) -> (B, L, 3, H, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, L, 3, H, d) -> 3 x (B, H, L, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, d); scale 1/√d
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))  # (B, H, L, d) -> (B, L, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # the exact (erf) GELU, as DINOv2's nn.GELU
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """x ← x + γ₁ ⊙ Attn(LN₁(x)); x ← x + γ₂ ⊙ MLP(LN₂(x))."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, MLP_RATIO * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # (N, 3, H, W) -> (N, D, h, w) -> (N, h·w, D)


def resample_grid(patch_pos: torch.Tensor, grid: tuple[int, int], *, offset: float,
                  antialias: bool) -> torch.Tensor:
    """Bicubic resampling of per-patch embeddings (1, G², D) to the grid (h, w) -> (1, h·w, D).

    With ``offset`` > 0 the official code's sampling: F.interpolate with scale factors
    ((h + offset) / G, (w + offset) / G), whose output is still h x w (the floor) but whose
    source coordinates are spaced G / (h + offset) apart instead of G / h. With offset 0 the
    output size is given and G x G -> G x G is the identity."""
    side, dim = math.isqrt(patch_pos.shape[1]), patch_pos.shape[2]
    image = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, G², D) -> (1, D, G, G)
    if offset:
        sampling = {"scale_factor": ((grid[0] + offset) / side, (grid[1] + offset) / side)}
    else:
        sampling = {"size": tuple(grid)}
    image = F.interpolate(image.float(), mode="bicubic", antialias=antialias, **sampling)
    if tuple(image.shape[-2:]) != tuple(grid):
        raise ValueError(f"resampling pos_embed gave a {tuple(image.shape[-2:])} grid, not {tuple(grid)}")
    return image.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(patch_pos.dtype)  # -> (1, h·w, D)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], *, offset: float = 0.1,
                          antialias: bool = False) -> torch.Tensor:
    """pos_embed (1, 1 + G², D) for a patch grid (h, w): (1, 1 + h·w, D), the CLS position
    kept, the patch positions resampled (`resample_grid`); unchanged when (h, w) = (G, G),
    as in the official code (which skips the resampling there too)."""
    side = math.isqrt(pos_embed.shape[1] - 1)
    if tuple(grid) == (side, side):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]  # (1, 1 + G², D) -> (1, 1, D), (1, G², D)
    return torch.cat([cls_pos, resample_grid(patch_pos, grid, offset=offset, antialias=antialias)], dim=1)


class VisionTransformer(nn.Module):
    """DINOv2's ViT without a head: normalised images (N, 3, H, W), H and W multiples of the
    patch size, -> the final-normed CLS token (N, D)."""

    def __init__(self, shape: ViTShape):
        super().__init__()
        self.shape = shape
        dim = shape.dim
        self.interpolation = INTERPOLATION[shape.num_registers > 0]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + shape.pos_grid**2, dim))
        if shape.num_registers:  # "Vision Transformers need registers", arXiv 2309.16588
            self.register_tokens = nn.Parameter(torch.zeros(1, shape.num_registers, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.patch_embed = PatchEmbed(dim, shape.patch_size)
        self.blocks = nn.ModuleList(Block(dim, shape.num_heads) for _ in range(shape.depth))
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.shape[0]
        grid = (images.shape[2] // self.shape.patch_size, images.shape[3] // self.shape.patch_size)
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), self.patch_embed(images)], dim=1)  # (N, 1 + h·w, D)
        tokens = tokens + interpolate_pos_embed(self.pos_embed, grid, **self.interpolation)
        if self.shape.num_registers:  # registers go after CLS, without a position
            registers = self.register_tokens.expand(batch, -1, -1)
            tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)  # (N, 1 + R + h·w, D)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens[:, 0])  # LayerNorm is per token: the CLS token alone


def vit_from_state_dict(state: Mapping[str, torch.Tensor]) -> VisionTransformer:
    """The network of a DINOv2 checkpoint, with the checkpoint's tensors (as float32) as its
    parameters; a ValueError naming the first missing or unexpected key, or a key whose shape
    does not fit the rest. A state dict of meta tensors gives a meta network (no memory)."""
    shape = infer_shape({key: tuple(value.shape) for key, value in state.items()})
    with torch.device("meta"):  # the layout only: the parameters come from ``state``
        model = VisionTransformer(shape)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        first = f"missing key {missing[0]}" if missing else f"unexpected key {unexpected[0]}"
        more = len(missing) + len(unexpected) - 1
        raise ValueError(f"{first}{f' (and {more} more)' if more else ''}: not a DINOv2 ViT-S/B/L checkpoint "
                         f"({shape.variant} by its shapes)")
    for key, wanted in expected.items():
        if tuple(state[key].shape) != wanted:
            raise ValueError(f"key {key} has shape {tuple(state[key].shape)}, expected {wanted} for {shape.variant}")
    model.load_state_dict({key: value.float() for key, value in state.items()}, assign=True)
    return model.eval().requires_grad_(False)
