"""Evaluate a checkpoint: bits/dim on the test split, or FID / IS of samples.

    python evaluate.py ckpt=outputs/.../checkpoints/last.ckpt metric=nll
    python evaluate.py ckpt=... metric=fid samples=outputs/samples/.../samples_10000x32x32x3.npz \
        inception_weights=~/weights/pt_inception-2015-12-05-6726825d.pth
    python evaluate.py ckpt=... metric=fid feature_extractor=dinov2 \
        dinov2_weights=~/weights/dinov2_vitl14_pretrain.pth num_seeds=3
    python evaluate.py --help         # or: diffusion-evaluate --help
"""

import hydra
from omegaconf import DictConfig

from diffusion.jobs.errors import exit_on_user_error, run_entry_point
from diffusion.jobs.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="pkg://diffusion.configs", config_name="evaluate")
def run(cfg: DictConfig) -> None:
    # Inside the job too, so that Hydra adds no "Error executing job" line of its own.
    with exit_on_user_error(ValueError):
        evaluate(cfg)


def main() -> None:
    """Through the one error path (`diffusion.jobs.errors`): a user error, Hydra's (an unknown
    ``sampler=``) included, is one line on stderr and exit status 2."""
    run_entry_point(run, ValueError)  # every ValueError of the jobs is an input check
