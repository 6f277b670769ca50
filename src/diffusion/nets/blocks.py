"""Building blocks of the IDDPM/ADM UNet.

References:
- DDPM (Ho et al. 2020, arXiv 2006.11239), appendix B: Wide-ResNet blocks with GroupNorm,
  self-attention at 16x16, the timestep embedding added inside each residual block.
- IDDPM (Nichol & Dhariwal 2021, arXiv 2102.09672), sec. 5 / appendix A: several heads,
  attention at 16x16 and 8x8, scale-shift norm.
- ADM (Dhariwal & Nichol 2021, arXiv 2105.05233), sec. 3: adaptive group norm
  AdaGN(h, y) = y_s GroupNorm(h) + y_b, BigGAN-style residual up/downsampling,
  a fixed number of channels per head.
- GroupNorm: Wu & He 2018, arXiv 1803.08494. Gradient checkpointing: Chen et al. 2016,
  arXiv 1604.06174.

Submodule names (``in_layers``, ``emb_layers``, ``out_layers``, ``skip_connection``, ``qkv``,
``proj_out``, ``op``, ``conv``) and their order inside ``nn.Sequential`` follow
improved-diffusion's, so that its checkpoints load with an identity key map
(see ``diffusion.nets.convert``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

GROUP_NORM_GROUPS = 32


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that computes in at least float32 and returns the input's dtype.

    Half-precision statistics over large groups lose too much precision, so fp16/bf16
    activations are normalised in float32 (improved-diffusion's ``GroupNorm32`` does the same);
    float64 stays float64.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        weight = None if self.weight is None else self.weight.to(compute_dtype)
        bias = None if self.bias is None else self.bias.to(compute_dtype)
        out = F.group_norm(x.to(compute_dtype), self.num_groups, weight, bias, self.eps)
        return out.to(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """The UNet's normalisation layer: GroupNorm with 32 groups."""
    if channels % GROUP_NORM_GROUPS:
        raise ValueError(
            f"GroupNorm({GROUP_NORM_GROUPS}) needs a channel count divisible by "
            f"{GROUP_NORM_GROUPS}, got {channels} channels"
        )
    return GroupNorm32(GROUP_NORM_GROUPS, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters, so a residual branch starts as the identity (IDDPM code)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def maybe_checkpoint(function, *args: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Run ``function(*args)``, recomputing its activations in backward when ``enabled``.

    Non-reentrant checkpointing restores the RNG state for the recomputation, so dropout
    masks agree between the two passes.
    """
    if enabled and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
    return function(*args)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """``nn.Sequential`` that passes the embedding to the children that take one."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution when ``use_conv``."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 convolution when ``use_conv``, else 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.channels = channels
        self.use_conv = use_conv
        if use_conv:
            self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)  # (B, C, H, W) -> (B, C, H/2, W/2)


class Dropout(nn.Dropout):
    """`nn.Dropout` whose mask comes from ``torch.rand`` on a CPU.

    There ``F.dropout`` draws the mask with ``bernoulli_``, which made a dropout layer 1.4x
    slower forward and backward than this at the CIFAR UNet's sizes (about 3% of a
    training step). Same law: keep each value with probability 1 - p, scaled by
    1/(1 - p). The mask is a 0/1 tensor of the input's dtype, not a bool one: a product
    with a bool tensor takes PyTorch's type-promoting path, 5-8x the time of a plain
    product on a 2-core CPU, forward and backward; the layer as a whole ran x1.15 to x1.22 faster
    (bench/kernels.py, bench/results.md). The values are the bool mask's, bit for bit.
    Other devices keep their fused kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or self.inplace or not 0.0 < self.p < 1.0:
            return super().forward(x)
        # float32 draws, also under bf16; ge_ writes 1.0 where kept, 0.0 where dropped
        keep = torch.rand_like(x, dtype=torch.float32).ge_(self.p).to(x.dtype)
        return (x * keep).mul_(1.0 / (1.0 - self.p))


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding.

    h = conv(SiLU(GN(x))); then either h + W e (DDPM) or, with ``use_scale_shift_norm``,
    GN(h)·(1 + s) + b with (s, b) = W e (ADM's AdaGN, sec. 3); then
    zero-initialised conv(dropout(SiLU(·))); output = skip(x) + h.
    ``up``/``down`` resample inside the block (BigGAN style, ADM sec. 3) instead of in a
    separate layer; both branches are resampled without parameters.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            nn.Conv2d(channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, x, emb, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            # Resample between the activation and the conv, so the conv runs at the new size.
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_conv(self.h_upd(in_rest(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # (B, E) -> (B, E, 1, 1)
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)  # (B, 2C, 1, 1) -> 2 x (B, C, 1, 1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def qkv_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(Q Kᵀ / √d) V per head, from the token-major (B, T, 3C) output of the qkv
    projection, whose channels are head-major (head, then q/k/v, then d); returns (B, T, C)."""
    b, t, width = qkv.shape
    c = width // 3
    # (B, T, 3C) -> 3 x (B, heads, T, d), views with d innermost (stride 1): the fused (flash)
    # kernels take them without a copy (strided d falls back to the unfused math, x1.32 slower on a CPU)
    q, k, v = qkv.reshape(b, t, heads, 3, c // heads).permute(3, 0, 2, 1, 4).unbind(0)
    h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, d); scale 1/√d
    return h.transpose(1, 2).reshape(b, t, c)  # (B, heads, T, d) -> (B, T, heads, d) -> (B, T, C)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the spatial positions, with a residual connection.

    For each head, Attention(Q, K, V) = softmax(Q Kᵀ / √d) V (Vaswani et al. 2017,
    arXiv 1706.03762, eq. 1) with d = channels / heads, computed by
    ``F.scaled_dot_product_attention``.

    Q, K and V come from one 1x1 convolution ``qkv`` with 3·C output channels, laid out
    head-major as improved-diffusion's ``QKVAttention`` (and guided-diffusion's
    ``QKVAttentionLegacy``) read them: output channel ``h·3d + s·d + j`` is entry j of
    head h of q (s=0), k (s=1) or v (s=2). The head outputs are concatenated head-major
    (channel ``h·d + j``) before ``proj_out``. Given the same weights, this block computes
    the same function as improved-diffusion's.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            if num_heads < 1 or channels % num_heads:
                raise ValueError(
                    f"attention at {channels} channels: num_heads={num_heads} must be a "
                    f"positive divisor of {channels}"
                )
            self.num_heads = num_heads
        else:
            if num_head_channels < 1 or channels % num_head_channels:
                raise ValueError(
                    f"attention at {channels} channels: num_head_channels={num_head_channels} "
                    f"must be a positive divisor of {channels} (or -1 to use num_heads)"
                )
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maybe_checkpoint(self._forward, x, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        # Token-major: (B, C, H, W) -> (B, T, C), a view of a channels-last x. The 1x1
        # convolutions qkv and proj_out (Conv1d, so that improved-diffusion's weights load
        # as they are) run as matmuls over the tokens, and q, k, v and the heads' output need
        # no layout copy (bench/kernels.py: the block x1.06 faster forward and backward on a CPU).
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        qkv = F.linear(tokens, self.qkv.weight.squeeze(-1), self.qkv.bias)  # (B, T, 3C)
        h = qkv_attention(qkv, self.num_heads)
        h = F.linear(h, self.proj_out.weight.squeeze(-1), self.proj_out.bias)  # (B, T, C)
        return x + h.transpose(1, 2).reshape(b, c, *spatial)  # (B, T, C) -> (B, C, H, W)
