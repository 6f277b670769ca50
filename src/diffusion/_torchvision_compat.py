"""Make ``import torchvision`` work on a CPU-only torch.

The torchvision wheels on PyPI are CUDA builds: their ``_C`` extension links against
``libtorch_cuda.so``. With the CPU build of torch it cannot load, which torchvision
tolerates (its detection ops are simply unavailable) except that
``torchvision._meta_registrations`` then registers fake kernels for ``torchvision::nms``
and ``torchvision::qnms`` and fails because those operators were never defined.

This project uses only torchvision's datasets, transforms and image utilities, none of
which touch the compiled ops. When (and only when) the extension cannot load, we define
the two operator schemas so that the import succeeds; calling them still fails loudly.
This module must be imported before anything imports torchvision.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch


def _extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # torchvision is absent: nothing to repair
    folder = list(spec.submodule_search_locations)[0]
    path = os.path.join(folder, "_C.so")
    if not os.path.exists(path):
        return True
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError):
        return False
    return True


def ensure_torchvision_importable() -> None:
    if "torchvision" in sys.modules or _extension_loads():
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018 - already defined by an earlier call
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")  # noqa: TOR901
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    # Keep the library object alive for the life of the process.
    sys.modules[__name__]._library = lib


ensure_torchvision_importable()
