"""``diffusion.convert``: checkpoint converters, re-exported from `diffusion.nets.convert`.

``python -m diffusion.convert IN.pt OUT.ckpt --image_size 32 ...`` converts an
improved-diffusion checkpoint; the written layout is documented in `diffusion.nets.convert`.
"""

from diffusion.nets.convert import (
    DIFFUSION_FLAG_DEFAULTS,
    FLAG_DEFAULTS,
    MODEL_FLAG_DEFAULTS,
    build_config,
    diffusion_config_from_flags,
    from_improved_diffusion,
    main,
    save_checkpoint,
    unet_kwargs_from_flags,
)

__all__ = [
    "DIFFUSION_FLAG_DEFAULTS",
    "FLAG_DEFAULTS",
    "MODEL_FLAG_DEFAULTS",
    "build_config",
    "diffusion_config_from_flags",
    "from_improved_diffusion",
    "main",
    "save_checkpoint",
    "unet_kwargs_from_flags",
]

if __name__ == "__main__":
    main()
