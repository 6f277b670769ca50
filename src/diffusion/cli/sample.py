"""Sample from a checkpoint into an npz (uint8 NHWC, guided-diffusion's format) and a grid.

    python sample.py ckpt=outputs/.../checkpoints/last.ckpt sampler=ddim50 num_samples=64
    python sample.py ckpt=... sampler=ddpm sampler.steps=250 seed=1 weights=raw
    python sample.py --help           # or: diffusion-sample --help
"""

import hydra
from omegaconf import DictConfig

from diffusion.jobs.errors import exit_on_user_error, run_entry_point
from diffusion.jobs.sample import sample


@hydra.main(version_base="1.3", config_path="pkg://diffusion.configs", config_name="sample")
def run(cfg: DictConfig) -> None:
    # Inside the job too, so that Hydra adds no "Error executing job" line of its own.
    with exit_on_user_error(ValueError):
        sample(cfg)


def main() -> None:
    """Through the one error path (`diffusion.jobs.errors`): a user error, Hydra's (an unknown
    ``sampler=``) included, is one line on stderr and exit status 2."""
    run_entry_point(run, ValueError)  # every ValueError of the jobs is an input check
