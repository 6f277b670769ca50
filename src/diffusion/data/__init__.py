"""Data: datasets and their fixed splits, the resumable training loader, and (in
`diffusion.data.module`, the only module here that imports Lightning) the DataModule.

    from diffusion.data import DigitsData, DataModule
    data = DigitsData(batch_size=128); data.setup(); batch = next(iter(data.train_dataloader()))

Names load on first use, so reading a dataset never imports Lightning.
"""

from __future__ import annotations

from diffusion.utils.lazy import lazy_exports

_EXPORTS = {
    "ImageData": "diffusion.data.image_data",
    "DigitsData": "diffusion.data.image_data",
    "Cifar10Data": "diffusion.data.image_data",
    "CelebAData": "diffusion.data.image_data",
    "ImageNet64Data": "diffusion.data.image_data",
    "ImageFolderData": "diffusion.data.image_data",
    "SyntheticData": "diffusion.data.image_data",
    "SuperResData": "diffusion.data.superres",
    "DataModule": "diffusion.data.module",
    "ResumableDataLoader": "diffusion.data.loader",
    "digits_images": "diffusion.data.digits",
    "digits_split": "diffusion.data.digits",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports("diffusion.data", _EXPORTS, globals())
