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


@hydra.main(version_base="1.3", config_path="pkg://diffusion.configs", config_name="edit")
def run(cfg: DictConfig) -> None:
    # Inside the job too, so that Hydra adds no "Error executing job" line of its own.
    with exit_on_user_error(ValueError):
        edit(cfg)


def main() -> None:
    """Through the one error path (`diffusion.jobs.errors`): a user error, Hydra's (an unknown
    ``task=`` value is the job's, an unknown ``sampler=`` Hydra's) included, is one line on
    stderr and exit status 2."""
    run_entry_point(run, ValueError)  # every ValueError of the jobs is an input check
