"""Sample from a checkpoint into an npz (uint8 NHWC, guided-diffusion's format) and a grid.

    python sample.py ckpt=outputs/.../checkpoints/last.ckpt sampler=ddim50 num_samples=64
    python sample.py ckpt=... sampler=ddpm sampler.steps=250 seed=1 weights=raw
    python sample.py --help           # or: diffusion-sample --help
"""

import hydra
from omegaconf import DictConfig

from diffusion.jobs.errors import exit_on_user_error
from diffusion.jobs.sample import sample


@hydra.main(version_base="1.3", config_path="pkg://diffusion.configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        sample(cfg)
