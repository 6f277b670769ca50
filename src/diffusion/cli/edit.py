"""Edit images with a checkpoint: DDIM inversion and reconstruction, interpolation, SDEdit,
inpainting (RePaint), super-resolution of low-resolution inputs.

    python edit.py ckpt=outputs/.../checkpoints/last.ckpt task=reconstruct input=FOLDER_OR_NPZ sampler=ddim50
    python edit.py ckpt=... task=interpolate interpolation.source=seeds interpolation.num_pairs=4
    python edit.py ckpt=... task=sdedit strength=0.5 input=null split=test
    python edit.py ckpt=... task=inpaint sampler=ddpm250 inpaint.mask=center input=FOLDER_OR_NPZ
    python edit.py ckpt=CLASS_COND task=sdedit class_labels=8 sampler.guidance_scale=3 input=FOLDER_OR_NPZ
    python edit.py ckpt=SUPERRES task=superres input=LOW_RES_NPZ_OR_FOLDER     # or input=null split=test
    python edit.py --help             # or: diffusion-edit --help
"""

import hydra
from omegaconf import DictConfig

from diffusion.jobs.edit import edit
from diffusion.jobs.errors import exit_on_user_error, run_entry_point
from diffusion.utils.host_memory import retain_freed_memory


@hydra.main(version_base="1.3", config_path="pkg://diffusion.configs", config_name="edit")
def run(cfg: DictConfig) -> None:
    # Inside the job too, so that Hydra adds no "Error executing job" line of its own.
    with exit_on_user_error(ValueError):
        edit(cfg)


def main() -> None:
    """Through the one error path (`diffusion.jobs.errors`): a user error, Hydra's (an unknown
    ``task=`` value is the job's, an unknown ``sampler=`` Hydra's) included, is one line on
    stderr and exit status 2."""
    # A new process per job: glibc keeps the memory freed after each batch for the next one
    # instead of returning it to the kernel (utils/host_memory.py); on 2 CPU cores sample.py
    # spent 5.3 s of 20 s in page faults without it (bench/results.md).
    retain_freed_memory()
    run_entry_point(run, ValueError)  # every ValueError of the jobs is an input check
