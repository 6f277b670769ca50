"""What a training step costs, counted rather than timed: the UNet's model FLOPs per image,
the bytes autograd saves for backward, and the peak memory of a run.

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode on a meta-device copy (exact,
no compute) with gradient checkpointing off: model FLOPs, not recomputed ones. The saved
bytes are what gradient checkpointing reduces (a checkpointed block's input, kept alive by
the checkpoint, is not among them). Peak memory is torch.cuda.max_memory_allocated on CUDA;
on the CPU the process's peak RSS, which includes the interpreter and libraries.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import resource
from pathlib import Path

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.flop_counter import FlopCounterMode


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


def saved_activation_bytes(pl_module, batch) -> int:
    """Bytes of the tensors autograd saves for backward in one training loss, each storage
    once, parameters excluded. Eager, since compiled graphs hide their saved tensors from the
    hooks; the network is called through the class's ``denoiser``, not a timed wrapper that
    an instance may hold (train_timing.StepClock)."""
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
