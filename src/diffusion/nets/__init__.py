"""Networks: the IDDPM/ADM UNet and its blocks.

The checkpoint converters live in `diffusion.nets.convert` (also `diffusion.convert`); they
are not imported here so that ``python -m diffusion.nets.convert`` runs cleanly.
"""

from diffusion.nets.blocks import AttentionBlock, ResBlock, TimestepEmbedSequential
from diffusion.nets.embeddings import timestep_embedding
from diffusion.nets.unet import UNet

__all__ = ["AttentionBlock", "ResBlock", "TimestepEmbedSequential", "UNet", "timestep_embedding"]
