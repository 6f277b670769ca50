"""Training throughput (images/s) of the experiment presets, through the real Lightning loop.

Synthetic batches of the preset's shape stand in for the dataset (data loading is measured
separately), so the figure is the model, the diffusion math, the t-sampler, EMA and
Lightning. The first steps are discarded as warm-up.

    python bench/train_throughput.py                          # quickstart + CIFAR preset
    python bench/train_throughput.py --presets digits_quickstart --steps 50 --batch 128
    python bench/train_throughput.py --device cuda --precision bf16-mixed
"""

from __future__ import annotations

# ruff: noqa: I001  (common imports diffusion, which must precede lightning and torchvision)

from common import compose_preset, device_name, record, stamp  # first: imports diffusion

import argparse
import tempfile
import time

import hydra
import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from diffusion.training.run import build_module


class SyntheticImages(Dataset):
    def __init__(self, shape, num_classes, length):
        self.shape, self.num_classes, self.length = shape, num_classes, length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(index)
        label = torch.randint(0, self.num_classes or 1, (), generator=g)
        return torch.rand(self.shape, generator=g) * 2 - 1, label


class SyntheticData(L.LightningDataModule):
    def __init__(self, image_size, channels, num_classes, batch_size, length):
        super().__init__()
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        self.batch_size, self.length = batch_size, length

    def train_dataloader(self):
        data = SyntheticImages((self.channels, self.image_size, self.image_size), self.num_classes, self.length)
        batches = [torch.utils.data.default_collate([data[i] for i in range(j, j + self.batch_size)])
                   for j in range(0, self.batch_size * 4, self.batch_size)]
        return DataLoader(_Cycle(batches, self.length // self.batch_size), batch_size=None)


class _Cycle(Dataset):
    """Pre-built batches, served round-robin: no data-loading cost inside the timing."""

    def __init__(self, batches, length):
        self.batches, self.length = batches, length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return self.batches[index % len(self.batches)]


class StepTimer(L.Callback):
    def __init__(self, warmup):
        self.warmup, self.times = warmup, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())


SHAPES = {"digits_quickstart": (8, 1, 10), "cifar_cosine_learned_sigma": (32, 3, 10)}


def measure(preset, batch, steps, warmup, device, precision):
    with tempfile.TemporaryDirectory() as out:
        cfg = compose_preset(preset, [f"data.batch_size={batch}"], out)
        image_size, channels, classes = SHAPES[preset]
        data = SyntheticData(image_size, channels, classes, batch, batch * (steps + warmup + 1))
        module = build_module(cfg, data)
        timer = StepTimer(warmup)
        ema = hydra.utils.instantiate(cfg.callbacks.ema)
        trainer = L.Trainer(accelerator=device, devices=1, precision=precision, max_steps=steps + warmup,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[ema, timer], limit_val_batches=0,
                            gradient_clip_val=cfg.trainer.gradient_clip_val, default_root_dir=out)
        trainer.fit(module, datamodule=data)
        elapsed = timer.times[-1] - timer.times[warmup - 1]
        params = sum(p.numel() for p in module.model.parameters())
        return batch * steps / elapsed, params, torch.device(device if device != "gpu" else "cuda")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(SHAPES))
    parser.add_argument("--batch", type=int, default=None, help="default: 128 (quickstart), 32 (CIFAR on CPU)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    accel = "gpu" if args.device == "cuda" else "cpu"
    for preset in args.presets:
        batch = args.batch or (128 if preset == "digits_quickstart" or args.device == "cuda" else 32)
        rate, params, device = measure(preset, batch, args.steps, args.warmup, accel, args.precision)
        print(f"{preset}: {rate:.1f} images/s at batch {batch} ({params / 1e6:.2f}M parameters, {args.precision}, {device_name(device)})")
        if not args.no_record:
            record("Training throughput", ["date", "commit", "torch", "os", "device", "preset", "batch", "precision", "images/s"],
                   [*stamp(), device_name(device), preset, str(batch), args.precision, f"{rate:.1f}"])


if __name__ == "__main__":
    main()
