"""Distil a checkpoint into a student of few steps (progressive distillation).

    python distill.py ckpt=outputs/.../checkpoints/last.ckpt student_steps=4
    python distill.py ckpt=... start_steps=64 student_steps=2 steps_per_round=2000
    python sample.py ckpt=outputs/distill/<run>/student.ckpt sampler=student
    python distill.py --help           # or: diffusion-distill --help

Rerun with the same settings and hydra.run.dir=<run> to resume after an interruption.
"""

import hydra
from omegaconf import DictConfig

from diffusion.jobs.errors import exit_on_user_error, run_entry_point


@hydra.main(version_base="1.3", config_path="pkg://diffusion.configs", config_name="distill")
def run(cfg: DictConfig) -> None:
    with exit_on_user_error(ValueError):
        from diffusion.training.distill import distill  # noqa: PLC0415  (Lightning after the config)

        distill(cfg)


def main() -> None:
    """Through the one error path (`diffusion.jobs.errors`): a user error is one line on stderr
    and exit status 2."""
    run_entry_point(run, ValueError)
