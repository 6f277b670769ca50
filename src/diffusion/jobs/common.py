"""Pieces shared by the sample and evaluate jobs: devices, precision, seeds, progress."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import numpy as np
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from diffusion.utils.errors import ConfigError

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


def resolve_devices(device: str, num_devices: int = 1) -> list[str]:
    """``auto`` is CUDA when present, else the CPU; ``num_devices=-1`` takes every GPU.
    A device that is malformed or not there is a ConfigError naming ``device``/``num_devices``."""
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices == 0 or num_devices < -1:
        raise ConfigError(f"num_devices={num_devices!r} must be -1 (every visible GPU) or an integer >= 1")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = _device_type(device)
    if kind == "cuda":
        return _cuda_devices(device, num_devices)
    if num_devices not in (1, -1):
        raise ConfigError(f"num_devices={num_devices} needs device=cuda (or auto with GPUs); got device={device!r}")
    backend = getattr(torch, kind, None)  # torch.mps, torch.xpu, ...: only where they are present
    if kind != "cpu" and not (hasattr(backend, "is_available") and backend.is_available()):
        raise ConfigError(f"device={device!r} is not available here; use device=cpu, cuda or auto")
    return [device]


def _device_type(device: str) -> str:
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={device!r} is not a device name; use auto, cpu, cuda or cuda:N") from None


def _cuda_devices(device: str, num_devices: int) -> list[str]:
    available = torch.cuda.device_count()
    if available == 0:
        raise ConfigError(f"device={device} but no CUDA device is visible; use device=cpu (or auto)")
    index = torch.device(device).index
    if index is not None:  # one chosen GPU
        if index >= available:
            raise ConfigError(f"device={device} but only {available} CUDA device(s) are visible "
                              f"(cuda:0 to cuda:{available - 1})")
        if num_devices not in (1, -1):
            raise ConfigError(f"num_devices={num_devices} with device={device}: name no index "
                              "(device=cuda) to split the batches over several GPUs")
        return [device]
    count = available if num_devices == -1 else num_devices
    if count > available:
        raise ConfigError(f"num_devices={num_devices} but only {available} CUDA device(s) are visible")
    return [f"cuda:{i}" for i in range(count)]


def autocast_for(device: torch.device, precision: str | int) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` (32, bf16 or 16) on ``device``."""
    key = str(precision)
    if key not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {sorted(PRECISIONS)}")
    dtype = PRECISIONS[key]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def autocast_network(net: torch.nn.Module, device: torch.device, precision: str | int):
    """``net`` as the process calls a model, run under ``precision``'s autocast on ``device``,
    its output cast back to float32 so that the sampling and likelihood math stays float32."""
    autocast = autocast_for(device, precision)

    def model(x, t, **kwargs):
        with autocast:
            return net(x, t, **kwargs).float()

    return model


def batch_generator(seed: int, index: int, device: torch.device | str) -> torch.Generator:
    """A generator for batch ``index`` of a job seeded with ``seed``, independent of the others."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


class RateColumn(ProgressColumn):
    """Items per second of a rich progress task, e.g. ``12.3 img/s``."""

    def __init__(self, unit: str = "img"):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("?" if speed is None else f"{speed:.1f} {self.unit}/s", style="progress.data.speed")


@contextlib.contextmanager
def images_progress(total: int, done: int, description: str, enabled: bool = True,
                    unit: str = "img") -> Iterator[Callable[[int], None]]:
    """A rich progress bar over ``total`` items; yields ``advance(n)``."""
    if not enabled:
        yield lambda n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns) as progress:
        task = progress.add_task(description, total=total, completed=done)
        yield lambda n: progress.advance(task, n)
