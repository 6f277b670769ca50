"""Does a digits super-resolution model beat plain interpolation? (issue 16)

Takes the held-out digits (the val and test splits: images the model never trained on),
downsamples each by area averaging to the checkpoint's ``low_res_size`` exactly as
``SuperResData`` does in training, and upsamples those same low-resolution images back to
8x8 with the model (DDIM, ``--steps`` calls, one noise per image from ``--seed``) and with
bicubic, bilinear and nearest-neighbour interpolation. Each set of 8x8 images is scored in
one process, on the same features, against the training digits: ``fid_digits`` (the digits
classifier's Fréchet distance, as ``evaluate.py metric=fid``), precision and recall, and the
mean squared error per dimension to the true high-resolution images in [-1, 1] units.
The held-out digits themselves are scored as the floor.

    python bench/superres_quality.py outputs/digits_superres_4to8/RUN/checkpoints/last.ckpt

FID over a few hundred images is biased upwards (it falls with the number of samples); the
rows share the images and the count, so they compare with each other, not with the
1000-sample figures elsewhere in the README.
"""

from __future__ import annotations

# ruff: noqa: I001  (diffusion must be imported before torchvision)

import diffusion  # noqa: F401

import argparse
import json
import time

import torch
import torch.nn.functional as F

from diffusion.checkpoint import load_checkpoint
from diffusion.data.digits import digits_images
from diffusion.data.superres import downsample_area
from diffusion.evaluation.fid import DEFAULT_CACHE_DIR, DigitsFeatureExtractor, FIDEvaluator
from diffusion.utils.images import to_uint8
from diffusion.sampling.ddim import DDIMSampler


def held_out(splits: list[str]) -> torch.Tensor:
    """The uint8 (N, 1, 8, 8) digits of ``splits``, in order."""
    return torch.cat([digits_images(split)[0] for split in splits])


def interpolated(low_res: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(low_res, size=(size, size), mode=mode, **kwargs).clamp(-1, 1)


@torch.inference_mode()
def super_resolved(ckpt: str, low_res: torch.Tensor, steps: int, seed: int, batch_size: int) -> torch.Tensor:
    loaded = load_checkpoint(ckpt)
    sampler = DDIMSampler(steps=steps)
    generator = torch.Generator().manual_seed(seed)
    out = [sampler(loaded.diffusion, loaded.model, shape=(len(batch), *loaded.image_shape),
                   model_kwargs={"low_res": batch}, generator=generator)
           for batch in low_res.split(batch_size)]
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="a digits super-resolution checkpoint (experiment=digits_superres_4to8)")
    parser.add_argument("--splits", default="val,test", help="the held-out splits whose images are upsampled")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (network calls per image)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    loaded = load_checkpoint(args.ckpt)
    size = getattr(loaded.model, "low_res_size", None)
    if size is None:
        raise SystemExit(f"{args.ckpt} is not a super-resolution checkpoint (its UNet takes no low_res)")
    high_uint8 = held_out(args.splits.split(","))
    high = high_uint8.float() / 127.5 - 1
    low_res = downsample_area(high, size)

    start = time.perf_counter()
    candidates = {f"model (DDIM-{args.steps})": super_resolved(args.ckpt, low_res, args.steps, args.seed,
                                                              args.batch_size)}
    sampling_s = time.perf_counter() - start
    for mode in ("bicubic", "bilinear", "nearest"):
        candidates[mode] = interpolated(low_res, high.shape[-1], mode)
    candidates["held-out digits (floor)"] = high

    evaluator = FIDEvaluator(DigitsFeatureExtractor.load_or_fit(args.cache_dir), cache_dir=args.cache_dir)
    train = digits_images("train")[0]
    results = {"ckpt": args.ckpt, "low_res_size": size, "splits": args.splits, "num_images": len(high),
               "sampling_seconds": round(sampling_s, 1), "rows": {}}
    print(f"{len(high)} held-out digits ({args.splits}), {size}x{size} -> {high.shape[-1]}x{high.shape[-1]}; "
          f"model sampling {sampling_s:.1f} s")
    print(f"{'upsampler':>26} {'fid_digits':>10} {'precision':>9} {'recall':>7} {'mse/dim':>8}")
    for name, images in candidates.items():
        images_uint8 = to_uint8(images)
        scores = evaluator(images_uint8, dataset="digits", split="train", real_batches=lambda: [train])
        mse = float(((images_uint8.float() / 127.5 - 1) - high).pow(2).mean())
        row = {"fid_digits": scores["fid_digits"], "precision": scores["precision"], "recall": scores["recall"],
               "mse_per_dim": mse}
        results["rows"][name] = row
        print(f"{name:>26} {row['fid_digits']:10.2f} {row['precision']:9.3f} {row['recall']:7.3f} {mse:8.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
