"""Images as the project writes them: 8-bit quantisation and atomically written grids."""

from __future__ import annotations

import math
import os

import torch
from PIL import Image

from diffusion.utils.atomic import atomic_write


# make_grid and save_image below write what torchvision.utils' functions of those names
# write (the layout, the grey-to-RGB expansion, the rounding; tests/test_images.py compares
# them), without importing torchvision: its import loads torchvision's models, torch._dynamo
# and sympy, which cost sample.py about 1.1 s at start and 0.4 s at exit on 2 CPU cores,
# 9% of a 1000-image DDIM-50 job of the quickstart (bench/results.md), for one grid.
def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> torch.Tensor:
    """(N, C, H, W) -> (C', H', W'): the images in rows of ``nrow``, ``padding`` pixels of
    ``pad_value`` around each; one channel becomes three (grey RGB); one image is returned
    as it is, unpadded (torchvision.utils.make_grid's layout)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[0] == 1:
        return images[0]
    n, channels, height, width = images.shape
    columns = min(nrow, n)
    rows = math.ceil(n / columns)
    step_y, step_x = height + padding, width + padding
    grid = images.new_full((channels, rows * step_y + padding, columns * step_x + padding), pad_value)
    for k in range(n):
        y, x = divmod(k, columns)
        grid[:, y * step_y + padding:(y + 1) * step_y, x * step_x + padding:(x + 1) * step_x] = images[k]
    return grid


def save_image(grid: torch.Tensor, fp, format: str | None = None) -> None:
    """Write a [0, 1] grid (C, H, W) to the file object ``fp`` as 8-bit RGB (one channel as
    grey RGB), each value floor(255 x + 0.5) (torchvision.utils.save_image's rounding)."""
    if grid.shape[0] == 1:
        grid = grid.expand(3, -1, -1)
    array = grid.detach().mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()
    Image.fromarray(array).save(fp, format=format)


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
