"""Evaluate a checkpoint: bits/dim on the test split, or FID / IS of samples.

    python evaluate.py ckpt=outputs/.../checkpoints/last.ckpt metric=nll
    python evaluate.py ckpt=... metric=fid samples=outputs/samples/.../samples_10000x32x32x3.npz \
        inception_weights=~/weights/pt_inception-2015-12-05-6726825d.pth
    python evaluate.py --help         # or: diffusion-evaluate --help
"""

import hydra
from omegaconf import DictConfig

from diffusion.jobs.errors import exit_on_user_error
from diffusion.jobs.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="pkg://diffusion.configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        evaluate(cfg)
