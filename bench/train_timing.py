"""One timed training run through the real Lightning loop, and its instrumentation.

The run is the preset's module, its trainer settings (precision, clipping, accumulation) and
its per-step callbacks (EMA), without checkpoints, validation, loggers or progress bar, on
synthetic batches of the preset's shape built once on the device. A step is the time between
consecutive on_train_batch_start; the forward is the module's ``denoiser``; the backward runs
from on_before_backward to on_after_backward. CUDA events on the GPU (resolved after the run:
no synchronisation inside a step), time.perf_counter on the CPU.
"""

from __future__ import annotations

# ruff: noqa: I001  (diffusion must be imported before lightning and torchvision)

import diffusion  # noqa: F401  (first: makes torchvision, hence lightning, importable)

import dataclasses
import gc
import tempfile
import time

import hydra
import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from diffusion.data import SyntheticData
from diffusion.training.run import build_module
from diffusion.utils.host_memory import retain_freed_memory
from step_costs import flops_per_image, peak_memory, reset_peak_memory, saved_activation_bytes

# The callbacks that act at every step. The others act every N steps (checkpoints, sample
# grids), log (lr monitor), draw (progress bar) or only touch checkpoints, and stay out.
STEP_CALLBACKS = ("ema",)


@dataclasses.dataclass
class TrainRun:
    """One timed training run; times are per step, in seconds."""

    batch: int
    precision: str
    images_per_s: float
    step_s: float
    forward_s: float
    backward_s: float
    flops_per_image: float
    params: int
    peak_memory: int
    memory_kind: str
    saved_bytes: int

    @property
    def share_outside(self) -> float:
        return 1.0 - (self.forward_s + self.backward_s) / self.step_s

    @property
    def achieved(self) -> float:
        return self.flops_per_image * self.images_per_s


class RoundRobin(Dataset):
    """Pre-built batches served in turn (the loader's ``batch_size=None``: each item is a batch)."""

    def __init__(self, batches: list, length: int):
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.batches[index % len(self.batches)]


def synthetic_loader(like, batch_size: int, length: int, device: torch.device) -> DataLoader:
    """``length`` batches of `SyntheticData` (random 8-bit images) of the shape and labels of
    the dataset ``like``, four of them built once on the device and served round-robin: a
    step's time then holds no data loading and no host-to-device copy."""
    source = SyntheticData(image_size=like.image_size, channels=like.channels, num_classes=like.num_classes,
                           train_size=4 * batch_size, val_size=1, test_size=1, batch_size=batch_size)
    source.setup()
    batches = [(images.to(device), labels.to(device)) for images, labels in source.train_dataloader()]
    return DataLoader(RoundRobin(batches, length), batch_size=None)


class StepClock(L.Callback):
    """Marks each step's start, the UNet's forward and the backward.

    The forward is the module's ``denoiser``, wrapped on the instance (the module hands
    ``self.denoiser`` to the process at call time, so the wrapper sees every call, with or
    without torch.compile). On CUDA a mark is an event recorded on the stream and read after
    the run; on the CPU it is time.perf_counter. Nothing here synchronises inside a step.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.starts, self.forward, self.backward = [], [], []  # per step; spans are (begin, end)
        self._backward_begin = None

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, begin, end) -> float:
        return begin.elapsed_time(end) / 1e3 if self.cuda else end - begin

    def on_train_start(self, trainer, pl_module) -> None:
        denoiser = pl_module.denoiser

        def timed_denoiser(*args, **kwargs):
            begin = self.now()
            output = denoiser(*args, **kwargs)
            self.forward[-1].append((begin, self.now()))
            return output

        pl_module.denoiser = timed_denoiser

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(self.now())
        self.forward.append([])
        self.backward.append([])

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._backward_begin = self.now()

    def on_after_backward(self, trainer, pl_module) -> None:
        self.backward[-1].append((self._backward_begin, self.now()))

    def totals(self, first: int) -> tuple[float, float, float, int]:
        """(step, forward, backward) seconds summed over the steps from ``first`` to the one
        before last, and their number: a step ends where the next one starts."""
        if self.cuda:
            torch.cuda.synchronize()
        steps = range(first, len(self.starts) - 1)
        step = sum(self.seconds(self.starts[i], self.starts[i + 1]) for i in steps)
        forward = sum(self.seconds(*span) for i in steps for span in self.forward[i])
        backward = sum(self.seconds(*span) for i in steps for span in self.backward[i])
        return step, forward, backward, len(steps)


class MemoryProbe(L.Callback):
    """At the end of training, before Lightning moves the module to the CPU: the peak memory
    of the run, then the bytes saved for backward by one more training loss on the last batch."""

    def __init__(self, device: torch.device):
        self.device, self.batch = device, None
        self.peak_memory, self.saved_bytes = 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch = batch

    def on_train_end(self, trainer, pl_module) -> None:
        self.peak_memory = peak_memory(self.device)
        with trainer.strategy.precision_plugin.train_step_context():
            self.saved_bytes = saved_activation_bytes(pl_module, self.batch)


def make_trainer(cfg, device: torch.device, callbacks: list, root: str) -> L.Trainer:
    """The preset's Trainer settings (precision, clipping, accumulation, plugins) on one
    device for one pass over the synthetic batches; no checkpoints, validation, loggers,
    progress bar or summary."""
    return hydra.utils.instantiate(
        cfg.trainer, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
        num_nodes=1, strategy="auto", max_steps=-1, max_epochs=1, callbacks=callbacks,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        default_root_dir=root,
    )


def train_once(cfg, device: torch.device, warmup: int, steps: int) -> TrainRun:
    """Fit a fresh module for ``warmup + steps + 1`` batches and time steps warmup .. warmup+steps-1
    (each step ends where the next one starts, so the last batch only closes the window)."""
    if warmup < 1 or steps < 1:
        raise ValueError(f"warmup={warmup} and steps={steps} must both be ≥ 1")
    torch._dynamo.reset()  # every measurement compiles afresh (within its warm-up steps)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, verbose=False)
    torch.set_float32_matmul_precision(cfg.get("matmul_precision") or "highest")
    if cfg.get("retain_freed_memory"):
        retain_freed_memory()
    batch = int(cfg.data.batch_size)
    like = hydra.utils.instantiate(cfg.data)  # the dataset gives its shape and labels; no files are read
    module = build_module(cfg, like)
    loader = synthetic_loader(like, batch, warmup + steps + 1, device)
    keep = [hydra.utils.instantiate(cfg.callbacks[name]) for name in STEP_CALLBACKS
            if cfg.get("callbacks") and cfg.callbacks.get(name)]
    clock, probe = StepClock(device), MemoryProbe(device)
    gc.collect()  # the last run's trainer and module (reference cycles) leave the peak
    if device.type == "cuda":
        torch.cuda.empty_cache()
    memory_kind = reset_peak_memory(device)
    with tempfile.TemporaryDirectory() as root:
        trainer = make_trainer(cfg, device, [clock, *keep, probe], root)  # the clock's marks come first
        trainer.fit(module, train_dataloaders=loader)
    step, forward, backward, n = clock.totals(first=warmup)
    return TrainRun(
        batch=batch, precision=str(cfg.trainer.precision), images_per_s=batch * n / step,
        step_s=step / n, forward_s=forward / n, backward_s=backward / n,
        flops_per_image=flops_per_image(module, batch),
        params=sum(p.numel() for p in module.model.parameters()),
        peak_memory=probe.peak_memory, memory_kind=memory_kind, saved_bytes=probe.saved_bytes,
    )
