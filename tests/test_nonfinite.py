"""Non-finite steps: skipped on the device, counted, and reported with their step and t values."""

from __future__ import annotations

import hydra
import pytest
import torch

from diffusion.data.module import DataModule
from diffusion.training.ema import EMA
from diffusion.training.nonfinite import NonFiniteGuard, NonFiniteLossError
from diffusion.training.run import build_module

from conftest import quiet_trainer
from fixtures import InjectNaN
from test_train import TINY_RUN

NAN_STEP = 3


# ------------------------------------------------------------------------------- the guard
def test_guard_counts_and_remembers_the_first_and_latest_bad_steps():
    guard = NonFiniteGuard()
    steps = [(True, [1, 2]), (False, [3, 4]), (True, [5, 6]), (False, [7, 8]), (False, [9, 10])]
    for step, (ok, t) in enumerate(steps):
        guard.record(torch.tensor(ok), torch.tensor(t), step)
    report = guard.latest()
    assert (report.count, report.consecutive) == (3, 2)
    assert (report.first_step, report.first_t) == (1, [3, 4])
    assert (report.last_step, report.last_t) == (4, [9, 10])
    guard.record(torch.tensor(True), torch.tensor([0, 0]), 5)
    assert guard.latest().consecutive == 0 and guard.latest().count == 3


def test_guard_keeps_its_history_when_a_wider_batch_arrives_and_across_a_checkpoint():
    guard = NonFiniteGuard()
    guard.record(torch.tensor(False), torch.tensor([7]), 0)
    guard.record(torch.tensor(False), torch.tensor([1, 2, 3]), 1)
    restored = NonFiniteGuard()
    restored.load_state_dict(guard.state_dict())
    for g in (guard, restored):
        report = g.latest()
        assert (report.count, report.first_t, report.last_t) == (2, [7], [1, 2, 3])


def test_skip_policy_warns_once_per_new_bad_step_then_stops_after_too_many_in_a_row():
    guard = NonFiniteGuard("skip", max_consecutive=3)
    guard.record(torch.tensor(False), torch.tensor([4, 5]), 10)
    message = guard.check(guard.poll(), "ckpt/last.ckpt")
    assert "step 10" in message and "[4, 5]" in message and "1 skipped in all" in message
    assert guard.check(guard.poll(), None) is None  # nothing new
    for step in (11, 12):
        guard.record(torch.tensor(False), torch.tensor([6, 7]), step)
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite steps in a row .*step 12.*\[6, 7\].*ckpt/last"):
        guard.check(guard.poll(), "ckpt/last.ckpt")


def test_stop_policy_names_the_step_the_timesteps_and_the_checkpoint():
    guard = NonFiniteGuard("stop")
    guard.record(torch.tensor(True), torch.tensor([1]), 0)
    assert guard.check(guard.poll(), None) is None
    guard.record(torch.tensor(False), torch.tensor([42]), 1)
    with pytest.raises(NonFiniteLossError, match=r"step 1, batch timesteps t = \[42\].*no checkpoint written yet"):
        guard.check(guard.poll(), None)


@pytest.mark.parametrize("kwargs, match", [({"policy": "ignore"}, "'skip', 'stop'"), ({"max_consecutive": 0}, ">= 1")])
def test_bad_guard_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NonFiniteGuard(**kwargs)


# ------------------------------------------------------------------------ in a training run
def _state(trainer, module, ema):
    tensors = {f"w.{n}": p.detach().clone() for n, p in module.model.named_parameters()}
    for i, state in enumerate(trainer.optimizers[0].state.values()):
        tensors.update({f"opt.{i}.{k}": v.clone() for k, v in state.items() if torch.is_tensor(v)})
    for decay, averaged in ema.averaged_models.items():
        tensors.update({f"ema.{decay}.{n}": p.clone() for n, p in averaged.module.state_dict().items()})
    return tensors


class Probe(EMA):
    """The EMA callback, plus the NaN injection and snapshots around the poisoned step."""

    def __init__(self, inject):
        super().__init__(decays=(0.5,))
        self.inject, self.before, self.after, self.t = inject, {}, {}, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.inject.on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if trainer.global_step in (NAN_STEP - 1, NAN_STEP):
            self.before[trainer.global_step] = _state(trainer, pl_module, self)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.global_step - 1 in (NAN_STEP - 1, NAN_STEP):
            self.after[trainer.global_step - 1] = _state(trainer, pl_module, self)
        if trainer.global_step - 1 == NAN_STEP:
            self.t = pl_module._step_t.tolist()


def _fit(compose_cfg, tmp_path, overrides, inject, max_steps=6, **trainer_kwargs):
    cfg = compose_cfg("train", [*TINY_RUN, *overrides])
    data = hydra.utils.instantiate(cfg.data)
    module = build_module(cfg, data)
    datamodule = DataModule(data)
    probe = Probe(inject)
    trainer = quiet_trainer(tmp_path, [probe, *trainer_kwargs.pop("callbacks", [])], max_steps,
                            gradient_clip_val=1.0, **trainer_kwargs)
    return trainer, module, probe, lambda: trainer.fit(module, datamodule=datamodule)


@pytest.mark.parametrize("fused", [True, False])
def test_a_nan_batch_is_skipped_exactly_counted_and_reported(compose_cfg, tmp_path, fused):
    trainer, module, probe, fit = _fit(
        compose_cfg, tmp_path, [f"module.optimizer.fused={str(fused).lower()}"], InjectNaN([NAN_STEP]),
        log_every_n_steps=1,
    )
    with pytest.warns(UserWarning, match=rf"latest at step {NAN_STEP} \(batch timesteps t = \[\d"):
        fit()
    normal, poisoned = NAN_STEP - 1, NAN_STEP
    # A healthy step moves the weights, the optimizer state and the EMA (so this can fail) ...
    changed = [k for k in probe.before[normal] if not torch.equal(probe.before[normal][k], probe.after[normal][k])]
    assert {k.split(".")[0] for k in changed} == {"w", "opt", "ema"}
    # ... the poisoned one moves none of them, not even the optimizer's step count.
    for key, value in probe.before[poisoned].items():
        assert torch.equal(value, probe.after[poisoned][key]), key
    report = module.nonfinite.latest()
    assert (report.count, report.first_step, report.first_t) == (1, NAN_STEP, probe.t)
    assert trainer.callback_metrics["train/skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    assert trainer.global_step == 6  # the run went on


def test_the_stop_policy_raises_naming_the_step_the_timesteps_and_the_last_good_checkpoint(compose_cfg, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True)
    trainer, module, probe, fit = _fit(
        compose_cfg, tmp_path, ["module.nonfinite.policy=stop"], InjectNaN([NAN_STEP]),
        callbacks=[checkpoints], enable_checkpointing=True,
    )
    with pytest.raises(NonFiniteLossError) as error:
        fit()
    last = tmp_path / "ckpt" / "last.ckpt"
    assert f"step {NAN_STEP}, batch timesteps t = {probe.t}" in str(error.value)
    assert f"the last good checkpoint is {last}" in str(error.value)
    state = torch.load(last, weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())


def test_a_diverged_run_stops_after_max_consecutive_skips(compose_cfg, tmp_path):
    trainer, module, probe, fit = _fit(
        compose_cfg, tmp_path, ["module.nonfinite.max_consecutive=3"], InjectNaN(range(2, 100)), max_steps=20,
    )
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite steps in a row .*latest at step 4"), \
            pytest.warns(UserWarning, match="skipped"):
        fit()


def test_under_the_fp16_scaler_a_nan_batch_is_skipped_and_the_loss_scale_is_logged(compose_cfg, tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    # Lightning turns precision="16-mixed" into bf16 on a CPU; the plugin itself runs there.
    trainer, module, probe, fit = _fit(
        compose_cfg, tmp_path, [], InjectNaN([NAN_STEP]), log_every_n_steps=1,
        plugins=[MixedPrecision("16-mixed", "cpu")],
    )
    with pytest.warns(UserWarning, match=f"latest at step {NAN_STEP}"):
        fit()
    for key, value in probe.before[NAN_STEP].items():
        assert torch.equal(value, probe.after[NAN_STEP][key]), key
    # The scaler saw the overflow and halved its scale from 2**16; the log shows it.
    assert trainer.callback_metrics["train/loss_scale"] == 2.0**15
    assert module.nonfinite.latest().count == 1
