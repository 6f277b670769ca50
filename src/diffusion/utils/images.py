"""Images as the project writes them: 8-bit quantisation and atomically written grids."""

from __future__ import annotations

import math
import os

import torch
from PIL import Image

from diffusion.utils.atomic import atomic_write


# torchvision.utils is imported on first use: importing it loads torchvision's models and
# torch._dynamo (about 2 s), which sample.py would otherwise pay at every start for one grid.
def make_grid(*args, **kwargs) -> torch.Tensor:
    """``torchvision.utils.make_grid``."""
    from torchvision.utils import make_grid as torchvision_make_grid  # safe: diffusion is imported

    return torchvision_make_grid(*args, **kwargs)


def save_image(*args, **kwargs) -> None:
    """``torchvision.utils.save_image``."""
    from torchvision.utils import save_image as torchvision_save  # safe: diffusion is imported

    torchvision_save(*args, **kwargs)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] -> uint8 by round(127.5 (x + 1)), the inverse of the data scaling
    (k -> 2k/255 - 1) and improved-diffusion's rounding; any layout."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def image_format(path: str | os.PathLike) -> str:
    """PIL's format name for ``path``'s extension, or a ValueError naming the path."""
    extension = os.path.splitext(os.fspath(path))[1].lower()
    formats = Image.registered_extensions()
    if extension not in formats:
        raise ValueError(f"cannot tell the image format of {os.fspath(path)!r}; use one of .png, .jpg, .webp")
    return formats[extension]


def make_image_grid(images: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] -> one (3 or C, H', W') grid in [0, 1] on the CPU,
    ``nrow`` images per row (default ceil(sqrt(N)), square for square N)."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    images = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2  # [-1, 1] -> [0, 1]
    return make_grid(images, nrow=nrow, padding=2)


def save_grid(grid: torch.Tensor, path: str | os.PathLike) -> None:
    """Write a [0, 1] grid (C, H, W) as an image file, atomically."""
    fmt = image_format(path)
    with atomic_write(os.fspath(path)) as handle:
        save_image(grid, handle, format=fmt)


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> torch.Tensor:
    """Save (N, C, H, W) images in [-1, 1] as one grid image at ``path``, atomically.
    Returns the [0, 1] grid."""
    grid = make_image_grid(images, nrow)
    save_grid(grid, path)
    return grid
