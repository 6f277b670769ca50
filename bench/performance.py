"""Training and sampling performance of the experiment presets, against the device's own limit.

For each preset, on the device it runs on, one run of this harness reports:

1. training images/s at a stated batch through the real Lightning loop: the preset's module,
   its trainer settings (precision, clipping, accumulation) and its EMA callback, without
   checkpoints, validation, loggers or progress bar. Synthetic batches of the preset's shape,
   built once on the device, stand in for the data (loading is item 7). Warm-up steps are
   discarded.
2. the UNet's FLOPs per image for one training step (forward + backward of the UNet only),
   counted by torch.utils.flop_counter.FlopCounterMode on a meta-device copy (exact, no
   compute) with gradient checkpointing off: model FLOPs, not recomputed ones. Achieved
   FLOP/s = FLOPs/image x images/s.
3. the device's peak in the run's compute dtype (float32 for 32-true, bfloat16 for bf16-*,
   float16 for 16-*), measured in the same process and under the same TF32 settings: the best
   of a few large square matmuls, and the best of a few large 3x3 convolutions, each in both
   memory formats (contiguous, channels_last) with cuDNN autotuning on. FLOPs are nominal
   (2n³; 2·N·C²·9·H·W), so a Winograd or FFT convolution may beat the matmul peak. Model-FLOPs
   utilisation (MFU) = achieved / conv peak, also given against the matmul peak.
4. the share of a step spent outside the UNet's forward and backward (diffusion math,
   t-sampler, EMA, optimizer, Lightning), by instrumentation of one run: a step is the time
   between consecutive on_train_batch_start; the forward is the module's `denoiser` (wrapped
   on the instance); the backward runs from on_before_backward to on_after_backward. CUDA
   events on the GPU (resolved after the run: no synchronisation inside a step),
   time.perf_counter on the CPU. share_outside = 1 - (forward + backward) / step. (On a
   GPU that waits for kernel launches, the wait counts where it happens.)
5. peak memory: torch.cuda.max_memory_allocated on CUDA (reset before the run); on the CPU
   the process's peak RSS (VmHWM, reset before the run where Linux allows it, else
   getrusage's peak since start; either includes the interpreter and libraries). And the
   bytes that autograd saves for backward in one training loss, parameters excluded, each
   storage once, in eager mode under the run's precision: what gradient checkpointing reduces
   (a checkpointed block's input, kept alive by the checkpoint, is not among them).
6. sampling images/s at a stated batch, DDIM-50 unless --sampler says otherwise, with the
   config's UNet and precision (bench/sample_throughput.py's measure_config).
7. images/s of the preset's real training DataModule (its transforms, num_workers) on files
   written in the dataset's on-disk format to a temporary folder (digits: in memory), over
   the training images/s: > 1 means the loader can keep the model fed. The first batches
   (worker start-up) are discarded; batches the workers prefetched meanwhile count.

Ablations (--ablate): each variant is a pair of override lists (feature on, feature off) in
VARIANTS, applied on top of the run's own overrides. Every distinct config is measured once
per round, in the same process; rounds alternate the order (forward, then reversed) so that
drifts (clocks, temperature, caches) fall on both sides, and a variant's ratio is the median
over rounds of on/off measured in the same round. Each measurement starts a fresh module,
Trainer and torch.compile cache (compilation happens inside the warm-up steps).

Examples:

    python bench/performance.py                                  # both presets on the CPU
    python bench/performance.py --device cuda --precision bf16-mixed --channels-last
    python bench/performance.py --device cuda --presets cifar_cosine_learned_sigma \\
        --ablate channels_last,bf16,compile,fused,grad_checkpoint --repeats 3
    python bench/performance.py --device cuda --override matmul_precision=high --compile
    python bench/performance.py --presets digits_quickstart --batch 4 --steps 2 --warmup 1 \\
        --sample-batch 2 --loader-batches 2 --no-record            # a smoke run

Unless --no-record, rows go to bench/results.md ("Training performance (MFU harness)",
"Ablations", "Sampling throughput", "Data loading"), each with the device, date, commit and
the command line that reproduces it.
"""

from __future__ import annotations

# ruff: noqa: I001  (common imports diffusion, which must precede lightning and torchvision)

from common import REPO, compose_preset, device_name, record, stamp  # first: imports diffusion

import argparse
import contextlib
import copy
import dataclasses
import functools
import gc
import importlib
import logging
import math
import resource
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

import sample_throughput
from diffusion.training.run import build_module
from diffusion.utils.host_memory import retain_freed_memory

PRESETS = ("cifar_cosine_learned_sigma", "digits_quickstart")
# Defaults by device type: (warm-up steps, timed steps), and batches where 128 / 256 do not fit.
STEPS = {"cuda": (10, 50), "cpu": (3, 20)}
BATCH = {("cpu", "cifar_cosine_learned_sigma"): 8}
SAMPLE_BATCH = {("cpu", "cifar_cosine_learned_sigma"): 16}
# Each variant: (overrides with the feature, overrides without it). One line per variant.
VARIANTS = {
    "channels_last": (["model.channels_last=true"], ["model.channels_last=false"]),
    "bf16": (["trainer.precision=bf16-mixed"], ["trainer.precision=32-true"]),
    "compile": (["model.compile=true"], ["model.compile=false"]),
    "fused": (["module.optimizer.fused=true"], ["module.optimizer.fused=false"]),
    "grad_checkpoint": (["model.use_checkpoint=true"], ["model.use_checkpoint=false"]),
}
COMPUTE_DTYPES = {"32": torch.float32, "32-true": torch.float32, "bf16": torch.bfloat16,
                  "bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16": torch.float16,
                  "16-mixed": torch.float16, "16-true": torch.float16, "64": torch.float64,
                  "64-true": torch.float64}
SAMPLE_PRECISION = {torch.float32: "32", torch.bfloat16: "bf16", torch.float16: "16"}
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


def compute_dtype(precision) -> torch.dtype:
    if str(precision) not in COMPUTE_DTYPES:
        raise ValueError(f"trainer.precision={precision!r} is not one of {sorted(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[str(precision)]


# ------------------------------------------------------------------------- one training step
class RoundRobin(Dataset):
    """Pre-built batches served in turn (the loader's ``batch_size=None``: each item is a batch)."""

    def __init__(self, batches: list, length: int):
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.batches[index % len(self.batches)]


class SyntheticData(L.LightningDataModule):
    """Random batches of a DataModule's shape and labels, built once on the device and served
    round-robin: a step's time then holds no data loading and no host-to-device copy."""

    def __init__(self, like: L.LightningDataModule, batch_size: int, length: int, device: torch.device):
        super().__init__()
        self.image_size, self.channels, self.num_classes = like.image_size, like.channels, like.num_classes
        generator = torch.Generator().manual_seed(0)
        shape = (batch_size, self.channels, self.image_size, self.image_size)
        self.batches = [(torch.rand(shape, generator=generator).mul(2).sub(1).to(device),
                         torch.randint(0, self.num_classes or 1, (batch_size,), generator=generator).to(device))
                        for _ in range(4)]
        self.length = length

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RoundRobin(self.batches, self.length), batch_size=None)


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


def saved_activation_bytes(pl_module, batch) -> int:
    """Bytes of the tensors autograd saves for backward in one training loss, each storage
    once, parameters excluded. Eager, since compiled graphs hide their saved tensors from the
    hooks; the network is called through the class's ``denoiser``, not the timed wrapper."""
    x_start, labels = batch
    parameters = {p.untyped_storage().data_ptr() for p in pl_module.parameters()}
    sizes: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            sizes[storage.data_ptr()] = storage.nbytes()
        return tensor

    t, _ = pl_module.schedule_sampler.sample(x_start.shape[0], x_start.device)
    denoiser = functools.partial(type(pl_module).denoiser, pl_module)
    hooks = saved_tensors_hooks(pack, lambda tensor: tensor)
    with torch.enable_grad(), torch.compiler.set_stance("force_eager"), hooks:
        pl_module.diffusion.training_losses(denoiser, x_start.float(), t,
                                            model_kwargs=pl_module.model_kwargs(labels))
    return sum(sizes.values())


def reset_peak_memory(device: torch.device) -> str:
    """Reset the peak-memory counter before a run; returns what `peak_memory` will read."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "CUDA max_memory_allocated"
    try:  # Linux ≥ 4.0: writing 5 resets the process's peak RSS (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
        return "process peak RSS, reset before the run"
    except OSError:
        return "process peak RSS since start"


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def flops_per_image(module, batch: int) -> float:
    """Model FLOPs per image of one training step: the UNet's forward and backward at the
    module's input shape, timesteps and labels, counted by FlopCounterMode on a copy on the
    meta device (no compute; exact at any batch) with gradient checkpointing off, so that
    recomputation is not counted (model FLOPs, not hardware FLOPs)."""
    net = getattr(module.model, "_orig_mod", module.model)  # torch.compile's wrapper, if any
    if hasattr(net, "config"):  # the UNet: rebuilt from its constructor's arguments
        with torch.device("meta"):
            twin = type(net)(**{**net.config(), "use_checkpoint": False})
    else:
        twin = copy.deepcopy(net).to("meta")
    x = torch.zeros((batch, *module.image_shape), device="meta")
    t = module.diffusion.model_timesteps(torch.zeros(batch, dtype=torch.int64, device="meta"))
    model_kwargs = module.model_kwargs(torch.zeros(batch, dtype=torch.int64, device="meta"))
    with FlopCounterMode(display=False) as counter:
        twin(x, t, **model_kwargs).sum().backward()
    return counter.get_total_flops() / batch


# ----------------------------------------------------------------------------- device peak
@dataclasses.dataclass
class Peak:
    flops_per_s: float
    what: str  # the configuration that reached it


# Large enough to saturate the device (and small enough for a 2-core CPU).
MATMUL_SIZES = {"cuda": (4096, 8192, 16384), "cpu": (1024, 2048)}
CONV_SHAPES = {"cuda": ((128, 256, 64, 64), (128, 512, 32, 32), (256, 1024, 16, 16)),
               "cpu": ((8, 128, 32, 32), (16, 256, 16, 16))}  # (N, C_in = C_out, H, W)
TIMING_SECONDS = {"cuda": 0.5, "cpu": 0.2}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(call, device: torch.device, repeats: int = 3) -> float:
    """The best of ``repeats`` timings of a loop of calls lasting at least TIMING_SECONDS."""
    def loop(n: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(n):
            call()
        synchronize(device)
        return time.perf_counter() - start

    loop(1)  # warm-up: allocations, cuDNN's algorithm search
    n = 1
    while (elapsed := loop(n)) < TIMING_SECONDS[device.type]:
        n *= 2
    return min(elapsed, *(loop(n) for _ in range(repeats - 1))) / n


def tf32_note(device: torch.device, dtype: torch.dtype) -> str:
    if device.type != "cuda" or dtype != torch.float32:
        return ""
    return (f", cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
            f"matmul precision {torch.get_float32_matmul_precision()}")


@torch.inference_mode()
def matmul_peak(device: torch.device, dtype: torch.dtype, sizes=None) -> Peak:
    """The best FLOP/s of square matmuls (2n³ FLOPs each) over a few sizes."""
    best = Peak(0.0, "")
    for n in sizes or MATMUL_SIZES[device.type]:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        rate = 2 * n**3 / seconds_per_call(functools.partial(torch.mm, a, b), device)
        if rate > best.flops_per_s:
            best = Peak(rate, f"{str(dtype).removeprefix('torch.')} {n}x{n}{tf32_note(device, dtype)}")
    return best


@torch.inference_mode()
def conv_peak(device: torch.device, dtype: torch.dtype, shapes=None) -> Peak:
    """The best FLOP/s of 3x3 convolutions (C -> C channels, padding 1: 2·N·C²·9·H·W FLOPs)
    over a few shapes, in both memory formats, with cuDNN's autotuner on."""
    best = Peak(0.0, "")
    autotune = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        for n, c, h, w in shapes or CONV_SHAPES[device.type]:
            for layout in (torch.contiguous_format, torch.channels_last):
                x = torch.randn(n, c, h, w, device=device, dtype=dtype).contiguous(memory_format=layout)
                weight = torch.randn(c, c, 3, 3, device=device, dtype=dtype).contiguous(memory_format=layout)
                call = functools.partial(F.conv2d, x, weight, padding=1)
                rate = 2 * n * c * c * 9 * h * w / seconds_per_call(call, device)
                if rate > best.flops_per_s:
                    name = "channels_last" if layout == torch.channels_last else "contiguous"
                    what = f"{str(dtype).removeprefix('torch.')} {n}x{c}x{h}x{w} {name}"
                    best = Peak(rate, what + tf32_note(device, dtype))
    finally:
        torch.backends.cudnn.benchmark = autotune
    return best


# ----------------------------------------------------------------------------- data loading
LOADER_VAL_SIZE = 100  # images held out for validation: their number, not the per-image cost


def _fixtures():
    """tests/fixtures.py: writers of each dataset's real on-disk format."""
    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))
    return importlib.import_module("fixtures")


def write_cifar10(folder: Path, images: int) -> dict:
    _fixtures().write_cifar10(folder, n=math.ceil(images / 5))  # 5 training batch files
    return {"root": str(folder), "download": False, "val_size": LOADER_VAL_SIZE}


def write_imagenet64(folder: Path, images: int) -> dict:
    _fixtures().write_imagenet64(folder / "imagenet64", n_train=math.ceil(images / 10))  # 10 files
    return {"root": str(folder / "imagenet64"), "val_size": LOADER_VAL_SIZE}


# DataModule class -> writer of enough files in its format (None: the data is in memory).
DATA_FILES = {"DigitsDataModule": None, "Cifar10DataModule": write_cifar10,
              "ImageNet64DataModule": write_imagenet64}


def endless(loader):
    while True:  # epochs follow each other, as in training
        yield from loader


def loader_rate(cfg, warmup: int, batches: int) -> tuple[float, int] | None:
    """(images/s, num_workers) of the config's training loader over ``batches`` batches after
    ``warmup`` (at least one: worker start-up); None for a dataset without a writer here."""
    name = cfg.data._target_.rsplit(".", 1)[-1]
    if name not in DATA_FILES:
        return None
    batch = int(cfg.data.batch_size)
    with tempfile.TemporaryDirectory() as folder:
        writer = DATA_FILES[name]
        extra = writer(Path(folder), batch * (warmup + batches) + LOADER_VAL_SIZE) if writer else {}
        datamodule = hydra.utils.instantiate(cfg.data, **extra)
        datamodule.setup("fit")
        stream = endless(datamodule.train_dataloader())
        for _ in range(max(1, warmup)):
            next(stream)
        start = time.perf_counter()
        for _ in range(batches):
            next(stream)
        elapsed = time.perf_counter() - start
        stream.close()
    return batch * batches / elapsed, datamodule.num_workers


# ------------------------------------------------------------------------------- training
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
    data = SyntheticData(hydra.utils.instantiate(cfg.data), batch, warmup + steps + 1, device)
    module = build_module(cfg, data)
    keep = [hydra.utils.instantiate(cfg.callbacks[name]) for name in STEP_CALLBACKS
            if cfg.get("callbacks") and cfg.callbacks.get(name)]
    clock, probe = StepClock(device), MemoryProbe(device)
    gc.collect()  # the last run's trainer and module (reference cycles) leave the peak
    if device.type == "cuda":
        torch.cuda.empty_cache()
    memory_kind = reset_peak_memory(device)
    with tempfile.TemporaryDirectory() as root:
        trainer = make_trainer(cfg, device, [clock, *keep, probe], root)  # the clock's marks come first
        trainer.fit(module, datamodule=data)
    step, forward, backward, n = clock.totals(first=warmup)
    return TrainRun(
        batch=batch, precision=str(cfg.trainer.precision), images_per_s=batch * n / step,
        step_s=step / n, forward_s=forward / n, backward_s=backward / n,
        flops_per_image=flops_per_image(module, batch),
        params=sum(p.numel() for p in module.model.parameters()),
        peak_memory=probe.peak_memory, memory_kind=memory_kind, saved_bytes=probe.saved_bytes,
    )


@dataclasses.dataclass
class Ablation:
    name: str
    compares: str
    baseline: TrainRun  # the last run with the feature off
    variant: TrainRun  # the last run with it on
    baseline_rate: float  # median images/s over rounds
    variant_rate: float
    ratio: float  # median over rounds of on/off


def ablate(preset: str, base: list[str], names: list[str], device, args, out: str) -> list[Ablation]:
    """Measure every distinct config of the named variants once per round (see the module's
    docstring for the order), and compare each variant's on and off configs."""
    configs, pairs = {}, {}
    for name in names:
        keys = []
        for extra in VARIANTS[name]:
            cfg = compose_preset(preset, [*base, *extra], out)
            keys.append(OmegaConf.to_yaml(cfg))  # identical configs are measured once
            configs.setdefault(keys[-1], cfg)
        pairs[name] = keys
    rates = {key: [] for key in configs}
    runs = {}
    for round_ in range(args.repeats):
        order = list(configs) if round_ % 2 == 0 else list(reversed(configs))
        for key in order:
            runs[key] = train_once(configs[key], device, args.warmup, args.steps)
            rates[key].append(runs[key].images_per_s)
    results = []
    for name, (on, off) in pairs.items():
        ratios = [a / b for a, b in zip(rates[on], rates[off], strict=True)]
        compares = " ".join(VARIANTS[name][0]) + " vs " + " ".join(VARIANTS[name][1])
        results.append(Ablation(name, compares, runs[off], runs[on], statistics.median(rates[off]),
                                statistics.median(rates[on]), statistics.median(ratios)))
    return results


def sampling_rate(cfg, device: torch.device, batch: int, sampler: str, max_seconds: float):
    """(images/s, model evaluations) of ``sampler`` with the config's UNet, under its precision."""
    like = hydra.utils.instantiate(cfg.data)
    precision = SAMPLE_PRECISION.get(compute_dtype(cfg.trainer.precision), "32")
    return sample_throughput.measure_config(cfg, like.image_size, like.channels, sampler, batch,
                                            str(device), precision, max_seconds)


# ------------------------------------------------------------------------------ reporting
def gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def tflops(x: float) -> str:
    return f"{x / 1e12:.3g}"


def summary(preset: str, device, run: TrainRun, conv: Peak, mm: Peak, options: str) -> str:
    lines = [
        f"== {preset} on {device_name(device)}: batch {run.batch}, precision {run.precision}, options: {options}",
        f"training      {run.images_per_s:.4g} images/s ({run.step_s * 1e3:.4g} ms/step)",
        f"model         {run.flops_per_image / 1e9:.4g} GFLOP/image (UNet forward + backward), "
        f"{run.params / 1e6:.3g}M parameters",
        f"achieved      {tflops(run.achieved)} TFLOP/s",
        f"device peak   conv 3x3 {tflops(conv.flops_per_s)} TFLOP/s ({conv.what}); "
        f"matmul {tflops(mm.flops_per_s)} TFLOP/s ({mm.what})",
        f"MFU           {run.achieved / conv.flops_per_s:.1%} of the conv peak, "
        f"{run.achieved / mm.flops_per_s:.1%} of the matmul peak",
        f"step split    forward {run.forward_s * 1e3:.4g} ms, backward {run.backward_s * 1e3:.4g} ms, "
        f"outside {(run.step_s - run.forward_s - run.backward_s) * 1e3:.4g} ms = "
        f"{run.share_outside:.1%} of the step",
        f"memory        peak {gib(run.peak_memory)} ({run.memory_kind}); "
        f"saved for backward {gib(run.saved_bytes)} per step",
    ]
    return "\n".join(lines)


def ablation_line(a: Ablation) -> str:
    return (f"ablation      {a.name}: {a.variant_rate:.4g} vs {a.baseline_rate:.4g} images/s = "
            f"x{a.ratio:.3f}; saved for backward {gib(a.variant.saved_bytes)} vs "
            f"{gib(a.baseline.saved_bytes)}, peak memory x{a.variant.peak_memory / a.baseline.peak_memory:.3f}"
            f"  ({a.compares})")


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def record_rows(report: dict) -> None:
    run, dev, cmd = report["train"], report["device"], cell(report["command"])
    head = ["device", "date", "commit", "torch", "os", "preset"]
    first = [dev, *stamp(), report["preset"]]
    record("Training performance (MFU harness)",
           [*head, "batch", "precision", "options", "images/s", "GFLOP/image", "achieved TFLOP/s",
            "conv peak TFLOP/s", "matmul peak TFLOP/s", "MFU vs conv", "MFU vs matmul",
            "share outside fwd+bwd", "peak memory", "saved activations", "command"],
           [*first, str(run.batch), run.precision, cell(report["options"]), f"{run.images_per_s:.4g}",
            f"{run.flops_per_image / 1e9:.4g}", tflops(run.achieved), tflops(report["conv"].flops_per_s),
            tflops(report["matmul"].flops_per_s), f"{run.achieved / report['conv'].flops_per_s:.1%}",
            f"{run.achieved / report['matmul'].flops_per_s:.1%}", f"{run.share_outside:.1%}",
            f"{gib(run.peak_memory)} ({run.memory_kind})", gib(run.saved_bytes), f"`{cmd}`"])
    for a in report["ablations"]:
        record("Ablations",
               [*head, "batch", "variant", "compares", "rounds", "baseline img/s", "variant img/s",
                "ratio", "saved activations", "peak memory ratio", "command"],
               [*first, str(run.batch), a.name, cell(a.compares), str(report["repeats"]),
                f"{a.baseline_rate:.4g}", f"{a.variant_rate:.4g}", f"{a.ratio:.3f}",
                f"{gib(a.variant.saved_bytes)} vs {gib(a.baseline.saved_bytes)}",
                f"{a.variant.peak_memory / a.baseline.peak_memory:.3f}", f"`{cmd}`"])
    if report.get("sampling"):
        rate, evals, batch, precision = report["sampling"]
        record("Sampling throughput",
               ["date", "commit", "torch", "os", "device", "preset", "sampler", "model evaluations",
                "batch", "precision", "images/s"],
               [*stamp(), dev, report["preset"], report["sampler"], str(evals), str(batch), precision, f"{rate:.3g}"])
    if report.get("loader"):
        rate, workers = report["loader"]
        record("Data loading",
               [*head, "batch", "num_workers", "loader images/s", "training images/s", "loader/train", "command"],
               [*first, str(run.batch), str(workers), f"{rate:.4g}", f"{run.images_per_s:.4g}",
                f"{rate / run.images_per_s:.3g}", f"`{cmd}`"])


# ----------------------------------------------------------------------------- command line
FLAGS = ("channels_last", "compile", "grad_checkpoint")  # --channels-last etc.: the variant's "on" overrides
SKIPPABLE = ("sampling", "data")


def comma_list(choices):
    def parse(text: str) -> list[str]:
        names = [name for name in text.split(",") if name]
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"{', '.join(unknown)}: not one of {', '.join(choices)}")
        return names

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--presets", nargs="+", default=list(PRESETS), help="experiment presets (conf/experiment/)")
    add("--device", default="cpu", choices=["cpu", "cuda"])
    add("--batch", type=int, help="training batch (default 128; 8 for the CIFAR preset on the CPU)")
    add("--warmup", type=int, help="discarded steps (default 10 on CUDA, 3 on the CPU)")
    add("--steps", type=int, help="timed steps (default 50 on CUDA, 20 on the CPU)")
    add("--override", action="append", default=[], metavar="KEY=VALUE",
        help="a Hydra override of the composed train config (repeatable)")
    add("--precision", help="trainer.precision: 32-true | bf16-mixed | 16-mixed")
    add("--channels-last", action="store_true", help="model.channels_last=true")
    add("--compile", action="store_true", help="model.compile=true")
    add("--grad-checkpoint", action="store_true", help="model.use_checkpoint=true")
    add("--ablate", type=comma_list(VARIANTS), default=[], metavar="NAME[,NAME...]",
        help=f"variants to compare in this process: {', '.join(VARIANTS)}")
    add("--repeats", type=int, default=3, help="ablation rounds (default 3)")
    add("--sampler", default="ddim50", help="sampler of the sampling figure (configs/sampler/)")
    add("--sample-batch", type=int, help="sampling batch (default 256; 16 for CIFAR on the CPU)")
    add("--sample-max-seconds", type=float, default=60.0,
        help="a longer sampling run is estimated from a 10-step one (sample_throughput.py)")
    add("--loader-batches", type=int, default=50, help="timed data-loader batches (default 50)")
    add("--skip", type=comma_list(SKIPPABLE), default=[], metavar="PART[,PART]",
        help=f"leave out parts: {', '.join(SKIPPABLE)}")
    add("--no-record", action="store_true", help="print only; leave bench/results.md alone")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    warmup, steps = STEPS[args.device]
    args.warmup = warmup if args.warmup is None else args.warmup
    args.steps = steps if args.steps is None else args.steps
    return args


def run_overrides(args: argparse.Namespace) -> list[str]:
    """--override values, then the convenience flags (later overrides win)."""
    overrides = list(args.override)
    if args.precision:
        overrides.append(f"trainer.precision={args.precision}")
    for flag in FLAGS:
        if getattr(args, flag):
            overrides.extend(VARIANTS[flag][0])
    return overrides


def command_line(args: argparse.Namespace, preset: str, batch: int, sample_batch: int) -> str:
    argv = ["python", "bench/performance.py", "--presets", preset, "--device", args.device,
            "--batch", str(batch), "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--sampler", args.sampler, "--sample-batch", str(sample_batch),
            "--loader-batches", str(args.loader_batches)]
    for override in run_overrides(args):
        argv += ["--override", override]
    if args.ablate:
        argv += ["--ablate", ",".join(args.ablate), "--repeats", str(args.repeats)]
    if args.skip:
        argv += ["--skip", ",".join(args.skip)]
    return shlex.join(argv)


def measure_preset(preset: str, args: argparse.Namespace, device: torch.device, peaks: dict) -> dict:
    """Every figure of one preset, printed as it comes; ``peaks`` caches the device's peaks by dtype."""
    batch = args.batch or BATCH.get((device.type, preset), 128)
    sample_batch = args.sample_batch or SAMPLE_BATCH.get((device.type, preset), 256)
    base = [*run_overrides(args), f"data.batch_size={batch}"]
    with tempfile.TemporaryDirectory() as out:
        cfg = compose_preset(preset, base, out)
        run = train_once(cfg, device, args.warmup, args.steps)
        dtype = compute_dtype(cfg.trainer.precision)
        if dtype not in peaks:  # after training: the same process, warm, same TF32 settings
            peaks[dtype] = (conv_peak(device, dtype), matmul_peak(device, dtype))
        report = {"preset": preset, "device": device_name(device), "train": run, "conv": peaks[dtype][0],
                  "matmul": peaks[dtype][1], "options": " ".join(run_overrides(args)) or "-",
                  "command": command_line(args, preset, batch, sample_batch), "repeats": args.repeats,
                  "sampler": args.sampler, "ablations": [], "sampling": None, "loader": None}
        print(summary(preset, device, run, report["conv"], report["matmul"], report["options"]), flush=True)
        if args.ablate:
            report["ablations"] = ablate(preset, base, args.ablate, device, args, out)
            print("\n".join(ablation_line(a) for a in report["ablations"]), flush=True)
        if "sampling" not in args.skip:
            rate, evals = sampling_rate(cfg, device, sample_batch, args.sampler, args.sample_max_seconds)
            report["sampling"] = (rate, evals, sample_batch, SAMPLE_PRECISION.get(dtype, "32"))
            print(f"sampling      {args.sampler} ({evals} evaluations): {rate:.4g} images/s at batch {sample_batch}")
        if "data" not in args.skip:
            report["loader"] = loader_rate(cfg, args.warmup, args.loader_batches)
            print(loader_line(report["loader"], run), flush=True)
    return report


def loader_line(loader: tuple[float, int] | None, run: TrainRun) -> str:
    if loader is None:
        return "data loading  n/a (no writer of this dataset's files in bench/performance.py)"
    rate, workers = loader
    return (f"data loading  {rate:.4g} images/s ({workers} workers) = x{rate / run.images_per_s:.3g} "
            "the training images/s (> 1: the loader keeps up)")


def quiet() -> None:
    """Lightning's start-up banner and the warnings a short synthetic run triggers."""
    logging.getLogger("lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    for message in ("does not have many workers", "smaller than the logging interval", "pin_memory",
                    "no `val_dataloader`", "`isinstance\\(treespec, LeafSpec\\)` is deprecated"):
        warnings.filterwarnings("ignore", message=f".*{message}")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    quiet()
    device, peaks, reports = torch.device(args.device), {}, []
    for preset in args.presets:
        reports.append(measure_preset(preset, args, device, peaks))
        if not args.no_record:
            record_rows(reports[-1])
    return reports


if __name__ == "__main__":
    main()
