"""What must hold on a CUDA device: mixed-precision steps (bf16; fp16 with its loss scaler),
the fused AdamW skipping a non-finite step, channels_last, ``model.compile=true``, the EMA,
the sample and evaluate jobs, a one-GPU DDP run and an exact resume.

Each check is a helper taking the device (and precision): the ``gpu``-marked tests run it on
CUDA (`bench/gpu_check.sh` runs ``pytest -m gpu``), and unmarked twins run the same helper on
the CPU wherever the CPU supports the feature, so that on a new GPU only the device is new.
The runs train a tiny UNet on 8x8 random images (``data=synthetic``: no files, and no
scikit-learn on the GPU machine).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import hydra
import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from diffusion.data.module import DataModule
from diffusion.jobs.evaluate import evaluate
from diffusion.jobs.sample import sample
from diffusion.training.ema import EMA
from diffusion.training.run import build_module

from conftest import REPO, compose_config, quiet_trainer, train_checkpoint
from fixtures import InjectNaN
from test_ema import RawRecorder, Regressor, _assert_state, _closed_form, _loader
from test_train import TINY_RUN

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ON_GPU = [pytest.mark.gpu, CUDA]

# A tiny UNet (T = 50) on 8x8 RGB random images, batches of 8.
SYNTHETIC_RUN = [*TINY_RUN, "data=synthetic", "data.image_size=8", "data.channels=3", "data.train_size=64",
                 "data.val_size=16", "data.test_size=16", "data.batch_size=8", "~callbacks.sample_grid"]
HALF = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
NAN_STEP = 2


def on(device: str, precision: str = "32-true") -> list[str]:
    return [f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}", "trainer.devices=1",
            f"trainer.precision={precision}"]


class Probe(L.Callback):
    """What the first step's first convolution saw (its input's layout, its output's dtype),
    where the parameters live, and the EMA's device, read without touching the step."""

    def __init__(self, hook: bool = True) -> None:
        self.hook, self.seen = hook, {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.seen["parameters"] = {p.device.type for p in pl_module.model.parameters()}
        if self.hook:  # a forward hook inside a compiled module would be traced: left out there
            conv = next(m for m in pl_module.model.modules() if isinstance(m, nn.Conv2d))
            self.handle = conv.register_forward_hook(self.record)

    def record(self, conv, inputs, output) -> None:
        self.seen["channels_last"] = inputs[0].is_contiguous(memory_format=torch.channels_last)
        self.seen["dtype"] = output.dtype
        self.handle.remove()

    def on_train_end(self, trainer, pl_module) -> None:
        ema = EMA.find(trainer)
        self.seen["ema"] = {p.device.type for a in ema.averaged_models.values() for p in a.parameters()}


def fit(tmp_path, device, precision="32-true", overrides=(), callbacks=(), max_steps=3, ckpt_path=None,
        hook=True):
    """The run's module and Trainer as `train` builds them, on ``device`` at ``precision``,
    with checkpoints every 2 steps; returns (trainer, module, probe)."""
    cfg = compose_config("train", [*SYNTHETIC_RUN, *on(device, precision), f"trainer.max_steps={max_steps}",
                                   "callbacks.model_checkpoint.every_n_train_steps=2",
                                   "callbacks.model_checkpoint.save_top_k=-1", "~callbacks.lr_monitor",  # no logger
                                   *overrides], tmp_path)
    data = hydra.utils.instantiate(cfg.data)
    module, probe = build_module(cfg, data), Probe(hook)
    run_callbacks = [hydra.utils.instantiate(node) for node in cfg.callbacks.values()]
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=[probe, *run_callbacks, *callbacks], logger=False,  # after the EMA
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=DataModule(data), ckpt_path=ckpt_path)
    return trainer, module, probe


def finite(trainer) -> bool:
    return all(bool(torch.isfinite(trainer.callback_metrics[k])) for k in ("train/loss", "train/grad_norm"))


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs come with the package


# ------------------------------------------------------------------- mixed precision
def check_mixed_precision(tmp_path, device, precision):
    trainer, module, probe = fit(tmp_path, device, precision, ["trainer.log_every_n_steps=1"])
    assert trainer.global_step == 3 and finite(trainer)
    assert probe.seen["parameters"] == {device} and probe.seen["dtype"] == HALF[precision]
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    assert (scaler is not None) == (precision == "16-mixed")
    if scaler is not None:  # fp16: the loss scaler ran, and its scale is logged
        assert trainer.callback_metrics["train/loss_scale"] > 0
    assert all(torch.isfinite(p).all() for p in module.model.parameters())


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.gpu
@CUDA
def test_mixed_precision_steps_on_cuda(tmp_path, precision):
    check_mixed_precision(tmp_path, "cuda", precision)


def test_bf16_steps_on_cpu(tmp_path):  # Lightning turns 16-mixed into bf16 on a CPU
    check_mixed_precision(tmp_path, "cpu", "bf16-mixed")


# --------------------------------------------------------------- non-finite step skip
class Snapshots(L.Callback):
    """Weights, optimizer state and EMA before and after the steps around the poisoned one."""

    def __init__(self) -> None:
        self.before, self.after = {}, {}

    @staticmethod
    def state(trainer, pl_module) -> dict[str, torch.Tensor]:
        tensors = {f"w.{n}": p.detach().clone() for n, p in pl_module.model.named_parameters()}
        for i, state in enumerate(trainer.optimizers[0].state.values()):
            tensors.update({f"opt.{i}.{k}": v.clone() for k, v in state.items() if torch.is_tensor(v)})
        for decay, averaged in EMA.find(trainer).averaged_models.items():
            tensors.update({f"ema.{decay}.{n}": p.clone() for n, p in averaged.module.state_dict().items()})
        return tensors

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step in (NAN_STEP - 1, NAN_STEP):
            self.before[trainer.global_step] = self.state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step - 1 in (NAN_STEP - 1, NAN_STEP):
            self.after[trainer.global_step - 1] = self.state(trainer, pl_module)


def check_nonfinite_skip(tmp_path, device, precision):
    """A NaN batch at NAN_STEP: the fused AdamW (or the fp16 scaler) skips the update on the
    device; weights, optimizer state and EMA stay as they were, and the run goes on."""
    snapshots = Snapshots()
    with pytest.warns(UserWarning, match=f"latest at step {NAN_STEP}"):
        trainer, module, _ = fit(tmp_path, device, precision, ["module.optimizer.fused=true",
                                                               "trainer.log_every_n_steps=1"],
                                 callbacks=[InjectNaN([NAN_STEP]), snapshots], max_steps=4)
    changed = {k.split(".")[0] for k, v in snapshots.before[NAN_STEP - 1].items()
               if not torch.equal(v, snapshots.after[NAN_STEP - 1][k])}
    if precision != "16-mixed":  # (fp16's first steps may overflow at the initial scale, and skip)
        assert changed == {"w", "opt", "ema"}  # a healthy step moves all three ...
    for key, value in snapshots.before[NAN_STEP].items():  # ... the poisoned one none of them
        assert torch.equal(value, snapshots.after[NAN_STEP][key]), key
    assert module.nonfinite.latest().count == 1 and trainer.callback_metrics["train/skipped_steps"] == 1
    assert trainer.global_step == 4 and all(torch.isfinite(p).all() for p in module.model.parameters())


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.gpu
@CUDA
def test_fused_adamw_skips_a_nonfinite_step_on_cuda(tmp_path, precision):
    check_nonfinite_skip(tmp_path, "cuda", precision)


def test_fused_adamw_skips_a_nonfinite_step_on_cpu(tmp_path):
    check_nonfinite_skip(tmp_path, "cpu", "32-true")


# ------------------------------------------------------------- channels_last, compile
def check_channels_last(tmp_path, device, precision):
    trainer, module, probe = fit(tmp_path, device, precision, ["model.channels_last=true"])
    assert finite(trainer) and probe.seen["channels_last"]
    convs = [m for m in module.model.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    _, _, plain = fit(tmp_path / "plain", device, precision)
    assert not plain.seen["channels_last"]  # the probe can tell the two layouts apart


@pytest.mark.gpu
@CUDA
def test_channels_last_on_cuda(tmp_path):
    check_channels_last(tmp_path, "cuda", "bf16-mixed")


def test_channels_last_on_cpu(tmp_path):
    check_channels_last(tmp_path, "cpu", "32-true")


def check_compile(tmp_path, device, precision):
    """model.compile=true trains (the compiled graph runs, its state-dict keys unchanged)
    and its checkpoint loads into a plain UNet."""
    trainer, module, _ = fit(tmp_path, device, precision, ["model.compile=true"], hook=False, max_steps=4)
    assert finite(trainer) and module.model._compiled_call_impl is not None
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not any("_orig_mod" in key for key in state["state_dict"])
    assert state["global_step"] == 4


@pytest.mark.gpu
@CUDA
def test_compile_on_cuda(tmp_path):
    check_compile(tmp_path, "cuda", "bf16-mixed")


@pytest.mark.slow
def test_compile_on_cpu_traced_by_aot_eager(tmp_path, monkeypatch):
    """Inductor's C++ build takes minutes on 2 cores: the twin traces with aot_eager (dynamo
    and AOT autograd, no code generation); the GPU test compiles for real."""
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", functools.partialmethod(compile_, backend="aot_eager"))
    torch._dynamo.reset()
    check_compile(tmp_path, "cpu", "32-true")


# ------------------------------------------------------------------------------ EMA
def check_ema(tmp_path, device):
    """The EMA callback on the device: averages in closed form (float64), kept on the device."""
    ema, recorder, module = EMA(decays=(0.5, 0.9)), RawRecorder(), Regressor()
    accelerator = "gpu" if device == "cuda" else "cpu"
    quiet_trainer(tmp_path, [ema, recorder], max_steps=5, accelerator=accelerator).fit(module, _loader())
    assert len(recorder.history) == 5
    for decay in (0.5, 0.9):
        averaged = ema.averaged_models[decay]
        assert {p.device.type for p in averaged.parameters()} == {device} and int(averaged.n_averaged) == 5
        _assert_state(averaged.module, _closed_form(recorder.history, decay))


@pytest.mark.gpu
@CUDA
def test_ema_on_cuda(tmp_path):
    check_ema(tmp_path, "cuda")
    _, _, probe = fit(tmp_path / "run", "cuda", "bf16-mixed")  # and the run's own EMA
    assert probe.seen["ema"] == {"cuda"}


def test_ema_on_cpu(tmp_path):
    check_ema(tmp_path, "cpu")


# ------------------------------------------------------------- sample and evaluate jobs
@pytest.fixture(scope="module")
def synthetic_ckpt(tmp_path_factory):
    """A checkpoint of a 2-step CPU run on random 8x8 RGB images."""
    return train_checkpoint(tmp_path_factory.mktemp("synthetic_run"), [
        *SYNTHETIC_RUN, "trainer.max_steps=2", "test_after_fit=false", "trainer.limit_val_batches=0"])


def check_jobs(tmp_path, ckpt, device, precision):
    """sample.py's job writes uint8 images; evaluate.py metric=nll bounds the test split's
    bits/dim, which on uniform 8-bit pixels cannot fall below their entropy, 8."""
    cfg = compose_config("sample", [f"ckpt={ckpt}", f"device={device}", f"precision={precision}",
                                    "sampler=ddim10", "num_samples=6", "batch_size=4", "progress=false"],
                         tmp_path / "samples")
    images = np.load(sample(cfg)["npz"])["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (6, 8, 8, 3)
    cfg = compose_config("evaluate", [f"ckpt={ckpt}", f"device={device}", "metric=nll", "batch_size=8",
                                      "progress=false"], tmp_path / "nll")
    result = evaluate(cfg)
    assert result["num_images"] == 16 and 8 <= result["bpd"] < 100
    return result


@pytest.mark.gpu
@CUDA
def test_sample_and_evaluate_nll_on_cuda(tmp_path, synthetic_ckpt):
    on_cuda = check_jobs(tmp_path, synthetic_ckpt, "cuda", "bf16")
    on_cpu = evaluate(compose_config("evaluate", [f"ckpt={synthetic_ckpt}", "device=cpu", "metric=nll",
                                                  "batch_size=8", "progress=false"], tmp_path / "cpu"))
    assert on_cuda["bpd"] == pytest.approx(on_cpu["bpd"], rel=0.05)  # the same bound, other noise


def test_sample_and_evaluate_nll_on_cpu(tmp_path, synthetic_ckpt):
    check_jobs(tmp_path, synthetic_ckpt, "cpu", "32")


# ------------------------------------------------------------------------ one-GPU DDP
def check_ddp_one_process(tmp_path, device, precision):
    """trainer=ddp on one device through train.py: fit, checkpoint, sharded test split."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "train.py", *SYNTHETIC_RUN, "trainer=ddp", *on(device, precision),
           "trainer.max_steps=3", "trainer.limit_val_batches=0", f"hydra.run.dir={out}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3
    assert "test bits/dim" in result.stdout + result.stderr


@pytest.mark.gpu
@CUDA
def test_ddp_on_one_gpu(tmp_path):
    check_ddp_one_process(tmp_path, "cuda", "bf16-mixed")


@pytest.mark.slow
def test_ddp_on_one_cpu_process(tmp_path):
    check_ddp_one_process(tmp_path, "cpu", "32-true")


# --------------------------------------------------------------------------- resume
def check_resume(tmp_path, device, precision, exact):
    """Stopped after step 2 and resumed: step, schedule, optimizer, EMA and the random state
    come back, and the weights at step 4 match the uninterrupted run's (bit for bit on the
    CPU; on CUDA to the reordering of its non-deterministic kernels)."""
    full, _, _ = fit(tmp_path / "full", device, precision, max_steps=4)
    step2 = tmp_path / "full" / "checkpoints" / "step0000002.ckpt"
    resumed, _, _ = fit(tmp_path / "resumed", device, precision, max_steps=4, ckpt_path=str(step2))
    a, b = (torch.load(tmp_path / run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
            for run in ("full", "resumed"))
    assert a["global_step"] == b["global_step"] == 4
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]
    random_state = next(v for k, v in b["callbacks"].items() if "RandomState" in k)
    if device == "cuda":  # the CUDA generators' states are saved too
        assert "cuda" in random_state
    for key, value in a["state_dict"].items():
        if exact:
            assert torch.equal(value, b["state_dict"][key]), key
        else:
            torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-3, atol=1e-4, msg=key)
    for decay in a["ema"]:
        for key, value in a["ema"][decay].items():
            torch.testing.assert_close(b["ema"][decay][key], value, rtol=0 if exact else 1e-3,
                                       atol=0 if exact else 1e-4, msg=key)


@pytest.mark.gpu
@CUDA
def test_resume_on_cuda(tmp_path):
    check_resume(tmp_path, "cuda", "32-true", exact=False)


def test_resume_on_cpu(tmp_path):
    check_resume(tmp_path, "cpu", "32-true", exact=True)
