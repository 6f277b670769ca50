"""Train a diffusion model. With no arguments: the digits quickstart on the CPU.

    python train.py                   # or: diffusion-train
    python train.py experiment=cifar_cosine_learned_sigma trainer=gpu
    python train.py -m experiment=digits_quickstart diffusion/schedule=linear,cosine
    python train.py --help            # every config group and its choices
"""

import hydra
from omegaconf import DictConfig

from diffusion.jobs.errors import exit_on_error
from diffusion.training.nonfinite import NonFiniteLossError
from diffusion.training.run import train


@hydra.main(version_base="1.3", config_path="pkg://diffusion.configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with exit_on_error((NonFiniteLossError,), 1):  # it names the step, its t values, the checkpoint
        metrics = train(cfg)
    # Returned so that Hydra sweepers can optimise it.
    return metrics.get("test/bpd", metrics.get("val/bpd"))
