"""Train a diffusion model. With no arguments: the digits quickstart on the CPU.

    python train.py                   # or: diffusion-train
    python train.py experiment=cifar_cosine_learned_sigma trainer=gpu
    python train.py -m experiment=digits_quickstart diffusion/schedule=linear,cosine
    python train.py --help            # every config group and its choices
"""

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from diffusion.jobs.errors import exit_on_error, exit_on_user_error, run_entry_point
from diffusion.training.nonfinite import NonFiniteLossError
from diffusion.training.preflight import prepare

ENTRY_MODULE = "diffusion.cli.train"  # `python -m diffusion.cli.train` runs this file's main()


@hydra.main(version_base="1.3", config_path="pkg://diffusion.configs", config_name="train")
def run(cfg: DictConfig) -> float | None:
    # Inside the job too, so that Hydra adds no "Error executing job" line of its own.
    with exit_on_user_error(), exit_on_error((NonFiniteLossError,), 1):  # it names the step, t, the checkpoint
        # The config, the checkpoint to resume and the data are checked before Lightning is
        # imported: a typo fails in seconds.
        prepared = prepare(cfg)
        from diffusion.training.ddp_launch import ranks_run_this_job  # noqa: PLC0415
        from diffusion.training.resume import Preempted, resume_command  # noqa: PLC0415
        from diffusion.training.run import train  # noqa: PLC0415

        try:
            with ranks_run_this_job(ENTRY_MODULE):  # DDP ranks in a -m sweep run this job alone
                metrics = train(cfg, prepared)
        except Preempted as stop:
            preempted = stop
        else:
            # Returned so that Hydra sweepers can optimise it.
            return metrics.get("test/bpd", metrics.get("val/bpd"))
    # SIGTERM or Ctrl-C: last.ckpt saved, but not a finished job.
    if preempted.report:
        program = "python train.py" if sys.argv[0].endswith("train.py") else os.path.basename(sys.argv[0])
        command = resume_command(preempted.output_dir, HydraConfig.get().overrides.task, program)
        print(f"{preempted}\nresume with: {command}", file=sys.stderr)
    sys.exit(preempted.exit_status)


def main() -> None:
    """train.py and diffusion-train: a user's error (config, data, files, disk) ends as one
    ``error:`` line and exit status 2 (`diffusion.jobs.errors`); a non-finite stop as one
    line and status 1; SIGTERM or Ctrl-C after saving last.ckpt, with the command that
    resumes and status 128 + the signal number."""
    run_entry_point(run)


if __name__ == "__main__":
    main()
