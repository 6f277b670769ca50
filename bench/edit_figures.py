"""The editing figures and the reconstruction table of the README ("Editing"), from one
digits checkpoint, through edit.py itself (issue 16):

- ``reconstruct`` of the first 100 test digits with 20, 50 and 100 DDIM steps (the mean
  squared error per dimension in [-1, 1] units, DDIM's Table 2);
- ``interpolate``: 6 pairs of seeds, 10 images per row (DDIM Fig. 6);
- ``inpaint``: RePaint with ``inpaint.mask=half`` on 16 test digits (DDPM-250, j = r = 10);
- ``sdedit`` of rough paintings: 16 test digits averaged over 2x2 blocks and reduced to three
  grey levels (a stand-in for stroke paintings), edited at strengths 0.4, 0.6 and 0.8.

    python bench/edit_figures.py outputs/digits_quickstart/RUN/checkpoints/last.ckpt --out docs
    python bench/edit_figures.py CKPT --superres-ckpt outputs/digits_superres_4to8/RUN/checkpoints/last.ckpt

Writes ``edit_interpolate.png``, ``edit_inpaint.png``, ``edit_sdedit.png`` (rows: the test
digits, the rough paintings, then one row per strength) and with ``--superres-ckpt``
``superres_digits.png`` (bicubic, the model, the originals) into ``--out``, each enlarged
``--scale`` times; prints the reconstruction errors.
"""

from __future__ import annotations

# ruff: noqa: I001  (diffusion must be imported before torchvision)

import diffusion  # noqa: F401

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion.data.digits import digits_images
from diffusion.utils.images import save_image_grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def edit(ckpt: str, run_dir: str, *overrides: str) -> dict:
    """One edit.py job into ``run_dir``; its JSON result."""
    command = [sys.executable, os.path.join(ROOT, "edit.py"), f"ckpt={ckpt}", "progress=false",
               f"hydra.run.dir={run_dir}", *overrides]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    task = next(o.split("=", 1)[1] for o in overrides if o.startswith("task="))
    with open(os.path.join(run_dir, f"{task}.json")) as f:
        return json.load(f)


def enlarged(png: str, out: str, scale: int) -> None:
    with Image.open(png) as image:
        image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(out)


def rows_png(rows: list[np.ndarray], out: str, scale: int) -> None:
    """uint8 (N, H, W, 1) rows of as many images each, as one grid (the project's grid helper), enlarged."""
    images = torch.from_numpy(np.concatenate(rows)).permute(0, 3, 1, 2).float() / 127.5 - 1
    save_image_grid(images, out, nrow=len(rows[0]))
    enlarged(out, out, scale)


def rough_paintings(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1, 8, 8) -> the 2x2 block means, in three grey levels (0, 127, 255)."""
    blocks = F.interpolate(F.avg_pool2d(images.float(), 2), scale_factor=2, mode="nearest")
    return (torch.round(blocks / 255 * 2) * 127.5).to(torch.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="an unconditional digits checkpoint (the quickstart's)")
    parser.add_argument("--superres-ckpt", help="a digits_superres_4to8 checkpoint")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--scale", type=int, default=4)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        print("reconstruction of the first 100 test digits (DDIM inversion, then decoding):")
        for steps in (20, 50, 100):
            result = edit(args.ckpt, f"{work}/rec{steps}", "task=reconstruct", "split=test", "num_images=100",
                          "batch_size=100", f"sampler.steps={steps}")
            print(f"  {steps:>3} steps ({2 * steps} calls per image): mse/dim {result['mse_per_dim']:.2e}")
        result = edit(args.ckpt, f"{work}/interp", "task=interpolate", "interpolation.source=seeds",
                      "interpolation.num_pairs=6", "interpolation.num_images=10")
        enlarged(result["grid"], f"{args.out}/edit_interpolate.png", args.scale)
        result = edit(args.ckpt, f"{work}/inpaint", "task=inpaint", "split=test", "num_images=16",
                      "sampler=ddpm250", "inpaint.mask=half")
        enlarged(result["grid"], f"{args.out}/edit_inpaint.png", args.scale)
        print(f"inpaint (half masks): {result['model_calls']} model calls per batch")

        originals = digits_images("test")[0][:16]
        rough = rough_paintings(originals)
        np.savez(f"{work}/rough.npz", arr_0=rough.permute(0, 2, 3, 1).numpy())
        rows = [originals.permute(0, 2, 3, 1).numpy(), rough.permute(0, 2, 3, 1).numpy()]
        for strength in (0.4, 0.6, 0.8):
            result = edit(args.ckpt, f"{work}/sdedit{strength}", "task=sdedit", f"input={work}/rough.npz",
                          "num_images=16", f"strength={strength}")
            with np.load(result["npz"]) as data:
                rows.append(data["arr_0"])
        rows_png(rows, f"{args.out}/edit_sdedit.png", args.scale)
        if args.superres_ckpt:
            result = edit(args.superres_ckpt, f"{work}/superres", "task=superres", "split=test", "num_images=16")
            enlarged(result["grid"], f"{args.out}/superres_digits.png", args.scale)
            print(f"superres (16 test digits): mse/dim {result['mse_per_dim']:.4f}, "
                  f"bicubic {result['bicubic_mse_per_dim']:.4f}")
    print(f"wrote the figures into {args.out}/")


if __name__ == "__main__":
    main()
