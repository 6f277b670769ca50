"""The IDDPM/ADM UNet.

The architecture of DDPM (Ho et al. 2020, arXiv 2006.11239, appendix B) with the changes of
IDDPM (Nichol & Dhariwal 2021, arXiv 2102.09672) and ADM (Dhariwal & Nichol 2021,
arXiv 2105.05233, sec. 3): a sinusoidal timestep embedding and a two-layer MLP, an
optional class embedding added to it, residual blocks (optionally with scale-shift norm and
BigGAN-style resampling), multi-head self-attention at chosen resolutions, and
zero-initialised output convolutions so a fresh model predicts 0.

Layout (module names as improved-diffusion's, so its checkpoints convert one-to-one):

    time_embed     Linear(C, 4C), SiLU, Linear(4C, 4C)
    label_emb      Embedding(num_classes [+ 1 null row], 4C)   (class-conditional only)
    input_blocks   conv_in, then per level: num_res_blocks x [ResBlock, (Attention)],
                   and a Downsample (or down-ResBlock) between levels
    middle_block   ResBlock, Attention, ResBlock
    output_blocks  per level, top-down: (num_res_blocks + 1) x [ResBlock on the concatenated
                   skip, (Attention), (Upsample or up-ResBlock after the last)]
    out            GroupNorm, SiLU, zero-initialised conv to out_channels

``attention_resolutions`` are feature-map sizes in pixels (16 means "at 16x16"), not the
downsampling rates that improved-diffusion's ``UNetModel`` takes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from diffusion.nets.blocks import (
    GROUP_NORM_GROUPS,
    AttentionBlock,
    Downsample,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
    normalization,
    zero_module,
)
from diffusion.nets.embeddings import timestep_embedding

# Channel multipliers per level by image size: 256/128/64/32 as improved- and
# guided-diffusion's script_util pick them; 16 and 8 (e.g. the 8x8 digits) are ours.
DEFAULT_CHANNEL_MULT: dict[int, tuple[int, ...]] = {
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
    16: (1, 2, 2),
    8: (1, 2),
}


def default_channel_mult(image_size: int) -> tuple[int, ...]:
    """The channel multipliers used for ``image_size`` when none are given."""
    if image_size not in DEFAULT_CHANNEL_MULT:
        raise ValueError(
            f"no default channel_mult for image_size={image_size}; pass channel_mult "
            f"explicitly or use one of {sorted(DEFAULT_CHANNEL_MULT)}"
        )
    return DEFAULT_CHANNEL_MULT[image_size]


# improved-diffusion's attention_resolutions default "16,8": the 16x16 and 8x8 feature maps.
DEFAULT_ATTENTION_RESOLUTIONS = (16, 8)


def default_attention_resolutions(image_size: int, channel_mult: Sequence[int]) -> tuple[int, ...]:
    """Attention where IDDPM puts it, on any image size: at the 16x16 and 8x8 levels that the
    UNet reaches, but never at the full image size (attention costs the square of the
    pixels); where neither remains (8x8 images: levels 8 and 4), at the lowest level alone."""
    reached = [image_size // 2**level for level in range(len(channel_mult))]
    return tuple(r for r in DEFAULT_ATTENTION_RESOLUTIONS if r in reached[1:]) or (reached[-1],)


def effective_levels(
    image_size: int, channel_mult: Sequence[int] | None, attention_resolutions: Sequence[int] | str | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(channel_mult, attention_resolutions) as the UNet uses them, a null replaced by the
    default for ``image_size`` (`DEFAULT_CHANNEL_MULT`, `default_attention_resolutions`)."""
    mult = default_channel_mult(image_size) if channel_mult is None else _int_tuple(channel_mult, "channel_mult")
    if attention_resolutions is None:
        return mult, default_attention_resolutions(image_size, mult)
    return mult, _int_tuple(attention_resolutions, "attention_resolutions")


def _int_tuple(value: Iterable[int] | str | int, name: str) -> tuple[int, ...]:
    """Plain ints from a list, tuple, Hydra ListConfig, a single int or a "16,8" string."""
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    elif isinstance(value, int):
        value = [value]
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a sequence of ints, got {value!r}") from err


class UNet(nn.Module):
    """IDDPM/ADM UNet predicting ε (or x_0, v, ...) and optionally the variance.

    Args:
        image_size: height = width of the images; sets the default ``channel_mult`` and
            which resolutions the levels run at (image_size / 2^level).
        in_channels: channels of x_t.
        model_channels: base width C; level i has ``C * channel_mult[i]`` channels.
        out_channels: in_channels, or 2 * in_channels when the variance is learned
            (mean part first).
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_resolutions: feature-map sizes (pixels) that get self-attention; None:
            IDDPM's 16 and 8 where the UNet reaches them below the image size, else its
            lowest level (`default_attention_resolutions`).
        dropout: dropout rate inside the residual blocks.
        channel_mult: multipliers per level; None picks ``DEFAULT_CHANNEL_MULT[image_size]``.
        conv_resample: learned 3x3 convolutions in up/downsampling (else nearest / avg-pool).
        num_classes: number of class labels for a class-conditional model, else None.
        null_class: add one more label, index ``num_classes`` (exposed as ``null_label``),
            meaning "no label": the unconditional model of classifier-free guidance (Ho &
            Salimans 2022, arXiv 2207.12598, sec. 3.2), learned by dropping labels in
            training. Needs ``num_classes``. ``null_label`` is None without it.
        use_checkpoint: gradient checkpointing in every residual and attention block.
        num_heads: attention heads (when ``num_head_channels`` is -1).
        num_head_channels: channels per head; overrides ``num_heads`` when not -1.
        num_heads_upsample: heads on the way up; -1 means ``num_heads``.
        use_scale_shift_norm: condition by GN(h)(1 + s) + b instead of adding the embedding.
        resblock_updown: resample with residual blocks (BigGAN style) instead of plain layers.
    """

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int] | None = None,
        dropout: float = 0.0,
        channel_mult: Sequence[int] | None = None,
        conv_resample: bool = True,
        num_classes: int | None = None,
        null_class: bool = False,
        use_checkpoint: bool = False,
        num_heads: int = 4,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
    ):
        super().__init__()
        channel_mult, attention_resolutions = effective_levels(image_size, channel_mult, attention_resolutions)
        _validate(
            image_size, model_channels, num_res_blocks, channel_mult, attention_resolutions,
            num_classes, dropout,
        )
        if null_class and num_classes is None:
            raise ValueError(
                "null_class=True needs a class-conditional UNet (num_classes set): the null "
                "label is the 'no label' input of classifier-free guidance"
            )
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.null_class = bool(null_class)
        # the label index that means "no label" (classifier-free guidance), or None
        self.null_label = num_classes if null_class else None
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resblock_updown = resblock_updown
        self._init_kwargs = dict(
            image_size=image_size, in_channels=in_channels, model_channels=model_channels,
            out_channels=out_channels, num_res_blocks=num_res_blocks,
            attention_resolutions=list(attention_resolutions), dropout=dropout,
            channel_mult=list(channel_mult), conv_resample=conv_resample,
            num_classes=num_classes, null_class=bool(null_class), use_checkpoint=use_checkpoint,
            num_heads=num_heads, num_head_channels=num_head_channels,
            num_heads_upsample=num_heads_upsample,
            use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
        )

        time_embed_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        if num_classes is not None:
            # one row per class, plus the null label's row (last) for classifier-free guidance
            self.label_emb = nn.Embedding(num_classes + int(null_class), time_embed_dim)
        skip_channels = self._build_input_blocks(time_embed_dim)
        ch = skip_channels[-1]
        self.middle_block = TimestepEmbedSequential(
            self._res_block(ch, ch, time_embed_dim),
            self._attention(ch, self.num_heads),
            self._res_block(ch, ch, time_embed_dim),
        )
        ch = self._build_output_blocks(time_embed_dim, skip_channels)
        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)),
        )

    # --------------------------------------------------------------------------- construction
    def _res_block(self, ch: int, out_ch: int, emb_dim: int, **updown: bool) -> ResBlock:
        return ResBlock(
            ch, emb_dim, self.dropout, out_channels=out_ch,
            use_scale_shift_norm=self.use_scale_shift_norm,
            use_checkpoint=self.use_checkpoint, **updown,
        )

    def _attention(self, ch: int, num_heads: int) -> AttentionBlock:
        return AttentionBlock(
            ch, num_heads=num_heads, num_head_channels=self.num_head_channels,
            use_checkpoint=self.use_checkpoint,
        )

    def _build_input_blocks(self, emb_dim: int) -> list[int]:
        """Fill ``input_blocks``; returns the channels of every skip activation, in order."""
        ch = self.model_channels * self.channel_mult[0]
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(self.in_channels, ch, 3, padding=1))]
        )
        skip_channels = [ch]
        for level, mult in enumerate(self.channel_mult):
            resolution = self.image_size // 2**level
            for _ in range(self.num_res_blocks):
                layers: list[nn.Module] = [self._res_block(ch, self.model_channels * mult, emb_dim)]
                ch = self.model_channels * mult
                if resolution in self.attention_resolutions:
                    layers.append(self._attention(ch, self.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                down = (
                    self._res_block(ch, ch, emb_dim, down=True)
                    if self.resblock_updown
                    else Downsample(ch, self.conv_resample)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
        return skip_channels

    def _build_output_blocks(self, emb_dim: int, skip_channels: list[int]) -> int:
        """Fill ``output_blocks``, consuming ``skip_channels``; returns the final width."""
        skip_channels = list(skip_channels)
        ch = skip_channels[-1]
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            resolution = self.image_size // 2**level
            for i in range(self.num_res_blocks + 1):
                in_ch = ch + skip_channels.pop()
                ch = self.model_channels * mult
                layers: list[nn.Module] = [self._res_block(in_ch, ch, emb_dim)]
                if resolution in self.attention_resolutions:
                    layers.append(self._attention(ch, self.num_heads_upsample))
                if level and i == self.num_res_blocks:
                    layers.append(
                        self._res_block(ch, ch, emb_dim, up=True)
                        if self.resblock_updown
                        else Upsample(ch, self.conv_resample)
                    )
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        return ch

    def config(self) -> dict:
        """The constructor's keyword arguments as plain Python values (lists, not tuples)."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._init_kwargs.items()}

    # --------------------------------------------------------------------------- forward
    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor | float, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict from x_t.

        Args:
            x: (N, in_channels, H, W) noisy images; H and W divisible by 2^(levels − 1).
            timesteps: (N,) step indices (int) or rescaled steps (float); a scalar is
                broadcast to the batch.
            y: (N,) int64 class labels in [0, num_classes), or ``null_label`` (= num_classes)
                with ``null_class``; required iff the model has ``num_classes``.

        Returns:
            (N, out_channels, H, W) in the dtype of ``x``.
        """
        timesteps = self._check_inputs(x, timesteps, y)
        emb_dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, dtype=emb_dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        h = x.to(self.input_blocks[0][0].weight.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C_h, H, W) + (B, C_s, H, W) -> (B, C_h + C_s, H, W)
            h = block(h, emb)
        return self.out(h).to(x.dtype)

    def _check_inputs(self, x, timesteps, y) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"x's height and width must be divisible by {factor} "
                f"(channel_mult={self.channel_mult}), got {tuple(x.shape[2:])}"
            )
        if self.num_classes is not None and y is None:
            raise ValueError(
                f"this UNet is class-conditional (num_classes={self.num_classes}): pass y, "
                "an (N,) tensor of int64 labels"
            )
        if self.num_classes is None and y is not None:
            raise ValueError("this UNet is unconditional (num_classes=None): y must be None")
        if y is not None and (y.shape != (x.shape[0],) or y.is_floating_point()):
            raise ValueError(
                f"y must be an integer tensor of shape ({x.shape[0]},), got "
                f"{y.dtype} of shape {tuple(y.shape)}"
            )
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        if timesteps.shape != (x.shape[0],):
            raise ValueError(
                f"timesteps must have shape ({x.shape[0]},), got {tuple(timesteps.shape)}"
            )
        return timesteps


def _validate(
    image_size, model_channels, num_res_blocks, channel_mult, attention_resolutions,
    num_classes, dropout,
) -> None:
    """Reject configurations that would fail (or silently differ) deep inside construction."""
    if not channel_mult or any(m < 1 for m in channel_mult):
        raise ValueError(f"channel_mult={list(channel_mult)} must be a non-empty list of positive ints")
    factor = 2 ** (len(channel_mult) - 1)
    if image_size < 1 or image_size % factor:
        raise ValueError(
            f"channel_mult={list(channel_mult)} halves the image {len(channel_mult) - 1} times, but "
            f"image_size={image_size} is not divisible by {factor}; use fewer levels than "
            f"{channel_mult} or another image size"
        )
    for mult in channel_mult:
        if (model_channels * mult) % GROUP_NORM_GROUPS:
            raise ValueError(
                f"model_channels={model_channels} gives model_channels * mult = {model_channels} * {mult} = "
                f"{model_channels * mult} channels, not divisible by {GROUP_NORM_GROUPS} (the GroupNorm "
                f"groups); use a multiple of {GROUP_NORM_GROUPS}"
            )
    if num_res_blocks < 1:
        raise ValueError(f"num_res_blocks={num_res_blocks} must be an integer >= 1")
    reached = [image_size // 2**level for level in range(len(channel_mult))]
    unreached = [r for r in attention_resolutions if r not in reached]
    if unreached:
        raise ValueError(
            f"attention_resolutions={list(attention_resolutions)}: {unreached} never reached by a UNet "
            f"with image_size={image_size} and channel_mult={channel_mult}; it runs at {reached} "
            "(null picks IDDPM's choice for the image size)"
        )
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes={num_classes!r} must be a positive int or None")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout} must be a number in [0, 1)")
