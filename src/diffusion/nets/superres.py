"""`SuperResUNet`: the UNet conditioned on a low-resolution image (IDDPM sec. 6 / App. A,
arXiv 2102.09672; improved-diffusion's ``SuperResModel``).

The low-resolution image is upsampled bilinearly to the high resolution and concatenated to
x_t on the channels, so the first convolution takes 2C channels; the output is the UNet's
(C, or 2C for learned variances). ``low_res`` reaches the network as a model kwarg, the way
class labels arrive as ``y``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffusion.nets.unet import UNet


class SuperResUNet(UNet):
    """A `UNet` on ``cat(x_t, upsample(low_res))``.

    Args:
        image_size: the high resolution (height = width of x_t and of the output).
        in_channels: C, the channels of x_t and of ``low_res`` (the network's first
            convolution takes 2C).
        low_res_size: height = width of ``low_res``; recorded in the run config, so a
            checkpoint rebuilds the same network and the jobs can check their inputs.
        **kwargs: the `UNet`'s other arguments.
    """

    def __init__(self, *, image_size: int, in_channels: int, low_res_size: int, **kwargs) -> None:
        if not isinstance(low_res_size, int) or not 1 <= low_res_size < image_size:
            raise ValueError(f"low_res_size={low_res_size!r} must be an int in [1, image_size={image_size})")
        super().__init__(image_size=image_size, in_channels=2 * in_channels, **kwargs)
        self.image_channels = in_channels
        self.low_res_size = low_res_size
        self._init_kwargs.update(in_channels=in_channels, low_res_size=low_res_size)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | float, low_res: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict from x_t (N, C, H, W) given ``low_res`` (N, C, low_res_size, low_res_size)."""
        expected = (x.shape[0], self.image_channels, self.low_res_size, self.low_res_size)
        if low_res is None or tuple(low_res.shape) != expected:
            got = "none" if low_res is None else tuple(low_res.shape)
            raise ValueError(f"this super-resolution UNet needs low_res of shape {expected}, got {got}")
        # improved-diffusion's SuperResModel: bilinear, align_corners=False (F.interpolate's default)
        upsampled = F.interpolate(low_res.to(x.dtype), size=x.shape[2:], mode="bilinear", align_corners=False)
        return super().forward(torch.cat([x, upsampled], dim=1), timesteps, y=y)  # 2 x (N, C, H, W) -> (N, 2C, H, W)
