"""Sampling throughput (images/s) of the presets' networks: DDIM-50 and DDPM with all steps.

The network is the preset's UNet with fresh weights (speed does not depend on them); the
process and the sampler are the ones sample.py uses.

    python bench/sample_throughput.py                      # CPU, both presets
    python bench/sample_throughput.py --device cuda --batch 1000 --precision bf16
"""

from __future__ import annotations

# ruff: noqa: I001  (common imports diffusion, which must precede lightning and torchvision)

from common import compose_preset, device_name, record, stamp  # first: imports diffusion

import argparse
import tempfile
import time

import hydra
import torch

from diffusion.jobs.common import autocast_network
from diffusion.sampling import get_sampler
from diffusion.checkpoint import build_unet, prepare_network, split_model_config


SHAPES = {"digits_quickstart": (8, 1), "cifar_cosine_learned_sigma": (32, 3)}


def measure(preset, sampler_name, batch, device, precision, max_seconds):
    with tempfile.TemporaryDirectory() as out:
        cfg = compose_preset(preset, [], out)
    image_size, channels = SHAPES[preset]
    return measure_config(cfg, image_size, channels, sampler_name, batch, device, precision, max_seconds)


def measure_config(cfg, image_size, channels, sampler_name, batch, device, precision, max_seconds):
    """(images/s, model evaluations) of ``sampler_name`` with the UNet of a composed train
    config (fresh weights), run as its ``model.channels_last`` and ``model.compile`` say."""
    process = hydra.utils.instantiate(cfg.diffusion)
    unet_cfg, runtime = split_model_config(cfg.model)
    net = build_unet(hydra.utils.instantiate(unet_cfg), process, image_size=image_size,
                     in_channels=channels, num_classes=None).to(device).eval()
    prepare_network(net, **runtime)  # a compiled network compiles in the warm-up run below
    model = autocast_network(net, torch.device(device), precision)

    sampler = get_sampler(sampler_name)
    steps = sampler.num_function_evals(process.num_timesteps)
    # Time a prefix of the loop when the full run would take too long (DDPM on a CPU):
    # images/s = batch / (time per step * steps).
    generator = torch.Generator(device=device).manual_seed(0)
    probe = get_sampler("ddim10") if steps > 10 else sampler
    with torch.inference_mode():
        probe(process, model, shape=(batch, channels, image_size, image_size), generator=generator)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        probe(process, model, shape=(batch, channels, image_size, image_size), generator=generator)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        per_step = (time.perf_counter() - start) / probe.num_function_evals(process.num_timesteps)
    if per_step * steps < max_seconds and probe is not sampler:
        with torch.inference_mode():
            start = time.perf_counter()
            sampler(process, model, shape=(batch, channels, image_size, image_size), generator=generator)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            per_step = (time.perf_counter() - start) / steps
    return batch / (per_step * steps), steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(SHAPES))
    parser.add_argument("--samplers", nargs="+", default=["ddim50", "ddpm"])
    parser.add_argument("--batch", type=int, default=None, help="default: 256 (quickstart), 16 (CIFAR on CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32", choices=["32", "bf16", "16"])
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="longer full runs are estimated from the per-step time of a 10-step run")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    for preset in args.presets:
        batch = args.batch or (256 if preset == "digits_quickstart" or args.device != "cpu" else 16)
        for name in args.samplers:
            rate, steps = measure(preset, name, batch, args.device, args.precision, args.max_seconds)
            device = device_name(torch.device(args.device))
            print(f"{preset} {name} ({steps} evaluations): {rate:.3g} images/s at batch {batch} on {device}")
            if not args.no_record:
                record("Sampling throughput",
                       ["date", "commit", "torch", "os", "device", "preset", "sampler", "model evaluations", "batch", "precision", "images/s"],
                       [*stamp(), device, preset, name, str(steps), str(batch), args.precision, f"{rate:.3g}"])


if __name__ == "__main__":
    main()
