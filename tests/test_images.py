"""diffusion.utils.images' grid writer against torchvision.utils, which it stands in for
(importing torchvision costs sample.py about 1.5 s; see the module's comment)."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import diffusion  # noqa: F401  (makes torchvision importable)
from diffusion.utils import images as images_module


@pytest.mark.parametrize("n, channels, nrow", [(1, 3, 8), (1, 1, 8), (2, 1, 8), (5, 3, 2), (9, 1, 3), (7, 3, 4), (6, 3, 6)])
def test_grid_and_png_equal_torchvision(n, channels, nrow):
    from torchvision.utils import make_grid, save_image

    generator = torch.Generator().manual_seed(n * 10 + channels)
    images = torch.rand(n, channels, 5, 4, generator=generator)
    images[0, 0, 0, 0], images[-1, -1, -1, -1] = 0.0, 1.0  # the ends of the range
    ours = images_module.make_grid(images, nrow=nrow, padding=2)
    theirs = make_grid(images, nrow=nrow, padding=2)
    assert ours.shape == theirs.shape and torch.equal(ours, theirs)

    written, expected = io.BytesIO(), io.BytesIO()
    images_module.save_image(ours, written, format="PNG")
    save_image(theirs, expected, format="PNG")
    pixels = np.asarray(Image.open(written))
    assert pixels.dtype == np.uint8 and pixels.shape == (*theirs.shape[1:], 3)
    assert np.array_equal(pixels, np.asarray(Image.open(expected)))


def test_one_channel_grid_is_written_as_grey_rgb():
    grid = torch.tensor([[[0.0, 0.5], [1.0, 0.2]]])  # (1, 2, 2)
    out = io.BytesIO()
    images_module.save_image(grid, out, format="PNG")
    pixels = np.asarray(Image.open(out))
    expected = np.array([[0, 128], [255, 51]], dtype=np.uint8)  # floor(255 x + 0.5)
    assert np.array_equal(pixels, np.stack([expected] * 3, axis=-1))


def test_writing_a_grid_does_not_import_torchvision(tmp_path):
    script = (f"import sys, torch; from diffusion.utils.images import save_image_grid; "
              f"save_image_grid(torch.zeros(4, 1, 8, 8), {str(tmp_path / 'g.png')!r}); "
              f"print(sorted(m for m in ('torchvision', 'torch._dynamo', 'sympy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]" and (tmp_path / "g.png").stat().st_size > 0
