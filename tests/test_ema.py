"""EMA callback: closed-form averages, swapping, validation, exact resume, checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from diffusion.training.ema import EMA

from conftest import quiet_trainer

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval:UserWarning"),
    pytest.mark.filterwarnings(
        "ignore:You defined a `validation_step` but have no `val_dataloader`"
    ),
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)"),
]

TOL = {"rtol": 1e-12, "atol": 1e-12}
BATCH = 4


class Regressor(L.LightningModule):
    """float64 MLP with a BatchNorm (a float buffer to average) trained by plain SGD."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = nn.Sequential(
            nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)
        ).double()
        self.seen_in_validation: list[dict[str, torch.Tensor]] = []
        self.seen_in_test: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        self.seen_in_validation.append(_float_state(self.model))

    def test_step(self, batch, batch_idx):
        self.seen_in_test.append(_float_state(self.model))

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.1)


class RawRecorder(L.Callback):
    """Records the raw weights after every optimizer step: history[k - 1] = w_k."""

    def __init__(self) -> None:
        self.history: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > len(self.history):
            self.history.append(_float_state(pl_module.model))


def _float_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def _loader(num_batches: int = 3) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(num_batches * BATCH, 3, generator=g, dtype=torch.float64)
    y = torch.randn(num_batches * BATCH, 2, generator=g, dtype=torch.float64)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def _closed_form(weights: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """AveragedModel's EMA written out: e_1 = w_1, e_n = d e_{n-1} + (1-d) w_n, i.e.
    e_n = d^(n-1) w_1 + sum_{j=2..n} (1-d) d^(n-j) w_j."""
    n = len(weights)
    out = {}
    for key in weights[0]:
        total = decay ** (n - 1) * weights[0][key]
        for j in range(2, n + 1):
            total = total + (1 - decay) * decay ** (n - j) * weights[j - 1][key]
        out[key] = total
    return out


def _assert_state(
    module: nn.Module, expected: dict[str, torch.Tensor], exact: bool = False
) -> None:
    actual = _float_state(module)
    assert actual.keys() == expected.keys()
    for key in expected:
        if exact:
            assert torch.equal(actual[key], expected[key]), key
        else:
            torch.testing.assert_close(actual[key], expected[key], **TOL, msg=key)


# --------------------------------------------------------------------------- averaging
def test_averages_match_closed_form_for_every_rate(tmp_path):
    ema, recorder, module = EMA(decays=(0.5, 0.9)), RawRecorder(), Regressor()
    quiet_trainer(tmp_path, [ema, recorder], max_steps=5).fit(module, _loader())
    assert len(recorder.history) == 5
    # The raw weights moved: an EMA equal to the last weights would not test anything.
    assert not torch.allclose(recorder.history[0]["0.weight"], recorder.history[-1]["0.weight"])
    for decay in (0.5, 0.9):
        averaged = ema.averaged_models[decay]
        assert int(averaged.n_averaged) == 5
        _assert_state(averaged.module, _closed_form(recorder.history, decay))
    # the live module still holds the raw weights of the last step
    _assert_state(module.model, recorder.history[-1], exact=True)


def test_update_every_n_steps_and_start_step(tmp_path):
    ema, recorder = EMA(decays=(0.8,), update_every_n_steps=2, start_step=2), RawRecorder()
    quiet_trainer(tmp_path, [ema, recorder], max_steps=7).fit(Regressor(), _loader())
    # updates after optimizer steps 4 and 6 only
    assert int(ema.averaged_models[0.8].n_averaged) == 2
    expected = _closed_form([recorder.history[3], recorder.history[5]], 0.8)
    _assert_state(ema.averaged_models[0.8].module, expected)


def test_gradient_accumulation_updates_once_per_optimizer_step(tmp_path):
    ema, recorder = EMA(decays=(0.7,)), RawRecorder()
    trainer = quiet_trainer(tmp_path, [ema, recorder], max_steps=4, accumulate_grad_batches=2)
    trainer.fit(Regressor(), _loader(num_batches=8))
    assert trainer.global_step == 4 and trainer.fit_loop.total_batch_idx + 1 == 8
    assert int(ema.averaged_models[0.7].n_averaged) == 4
    _assert_state(ema.averaged_models[0.7].module, _closed_form(recorder.history, 0.7))


# ---------------------------------------------------------------------------- swapping
def test_swapped_loads_ema_weights_and_restores_raw_exactly(tmp_path):
    ema, module = EMA(decays=(0.5, 0.9)), Regressor()
    quiet_trainer(tmp_path, [ema], max_steps=4).fit(module, _loader())
    raw = _float_state(module.model)
    param_ids = [id(p) for p in module.model.parameters()]
    for decay in (None, 0.5, 0.9):
        averaged = ema.averaged_models[0.5 if decay is None else decay]
        with ema.swapped(module, decay=decay) as swapped:
            assert swapped is module.model
            _assert_state(module.model, _float_state(averaged.module), exact=True)
            assert not torch.equal(module.model[0].weight, raw["0.weight"])
        _assert_state(module.model, raw, exact=True)
    # the optimizer's parameter objects are untouched, only their values moved
    assert [id(p) for p in module.model.parameters()] == param_ids
    with pytest.raises(ValueError, match=r"decay=0\.3.*\[0\.5, 0\.9\]"):
        with ema.swapped(module, decay=0.3):
            pass


def test_swapped_restores_after_an_exception(tmp_path):
    ema, module = EMA(decays=(0.5,)), Regressor()
    quiet_trainer(tmp_path, [ema], max_steps=2).fit(module, _loader())
    raw = _float_state(module.model)
    with pytest.raises(KeyError), ema.swapped(module):
        raise KeyError("boom")
    _assert_state(module.model, raw, exact=True)


def test_swapped_is_a_no_op_before_the_first_update():
    ema, module = EMA(), Regressor()
    raw = _float_state(module.model)
    with ema.swapped(module):  # no averages at all yet
        _assert_state(module.model, raw, exact=True)
    ema.on_fit_start(None, module)  # averages exist but hold no update
    with ema.swapped(module):
        _assert_state(module.model, raw, exact=True)


def test_validation_and_test_see_ema_weights(tmp_path):
    ema, recorder, module = EMA(decays=(0.6, 0.9)), RawRecorder(), Regressor()
    trainer = quiet_trainer(
        tmp_path,
        [ema, recorder],
        max_steps=6,
        limit_val_batches=1,
        num_sanity_val_steps=1,
        val_check_interval=3,
    )
    initial = _float_state(module.model)
    trainer.fit(module, _loader(num_batches=6), _loader(num_batches=1))
    sanity, at_step_3, at_step_6 = module.seen_in_validation
    _assert_state(module.model, recorder.history[-1], exact=True)  # raw after training
    for key in initial:  # the sanity check runs before any update: raw initial weights
        assert torch.equal(sanity[key], initial[key])
    for seen, step in ((at_step_3, 3), (at_step_6, 6)):
        expected = _closed_form(recorder.history[:step], 0.6)  # the first rate
        for key in expected:
            torch.testing.assert_close(seen[key], expected[key], **TOL)
    assert not torch.allclose(at_step_6["0.weight"], recorder.history[5]["0.weight"])
    # training continued from the raw weights: the same steps as a run without validation
    reference = RawRecorder()
    quiet_trainer(tmp_path, [EMA(decays=(0.6,)), reference], max_steps=6).fit(
        Regressor(), _loader(num_batches=6)
    )
    for ours, theirs in zip(recorder.history, reference.history, strict=True):
        _assert_state_dict(ours, theirs)
    trainer.test(module, _loader(num_batches=1), verbose=False)
    expected = _float_state(ema.averaged_models[0.6].module)
    for key in expected:
        assert torch.equal(module.seen_in_test[0][key], expected[key])
    _assert_state(module.model, recorder.history[-1], exact=True)


def test_use_for_validation_false_keeps_raw_weights(tmp_path):
    ema, recorder, module = EMA(decays=(0.6,), use_for_validation=False), RawRecorder(), Regressor()
    trainer = quiet_trainer(
        tmp_path, [ema, recorder], max_steps=3, limit_val_batches=1, val_check_interval=3
    )
    trainer.fit(module, _loader(), _loader(num_batches=1))
    _assert_state_dict(module.seen_in_validation[0], recorder.history[2])


def _assert_state_dict(actual, expected):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


# ------------------------------------------------------------------------- checkpoints
def test_resume_matches_an_uninterrupted_run_exactly(tmp_path):
    decays = (0.5, 0.9)
    # Uninterrupted: 6 steps (two epochs of 3 batches), a checkpoint every 3 steps. (The
    # step-3 checkpoint closes an epoch: Lightning replays a non-resumable loader from its
    # start when resuming mid-epoch, which would change the data, not the EMA logic.)
    full_ema, full_module = EMA(decays=decays), Regressor()
    saver = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}"
    )
    quiet_trainer(tmp_path, [full_ema, saver], max_steps=6, enable_checkpointing=True).fit(
        full_module, _loader()
    )
    # Resumed: a fresh module (other init) and a fresh callback, from the step-3 checkpoint.
    resumed_ema, resumed_module = EMA(decays=decays), Regressor(seed=7)
    resumer = quiet_trainer(tmp_path, [resumed_ema], max_steps=6)
    resumer.fit(resumed_module, _loader(), ckpt_path=tmp_path / "ckpt" / "step=3.ckpt")
    assert resumer.global_step == 6
    _assert_state_dict(_float_state(resumed_module.model), _float_state(full_module.model))
    for decay in decays:
        full, resumed = full_ema.averaged_models[decay], resumed_ema.averaged_models[decay]
        assert int(resumed.n_averaged) == int(full.n_averaged) == 6
        for (k1, v1), (k2, v2) in zip(
            full.state_dict().items(), resumed.state_dict().items(), strict=True
        ):
            assert k1 == k2 and torch.equal(v1, v2), k1


def test_checkpoint_holds_plain_ema_state_dicts_and_raw_weights(tmp_path):
    ema, module = EMA(decays=(0.5, 0.9)), Regressor()
    trainer = quiet_trainer(tmp_path, [ema], max_steps=3)
    trainer.fit(module, _loader())
    raw = {k: v.clone() for k, v in module.state_dict().items()}
    with ema.swapped(module):  # a save while swapped must still store the raw weights
        trainer.save_checkpoint(tmp_path / "a.ckpt")
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert set(checkpoint["ema"]) == {"0.5", "0.9"}
    for decay in (0.5, 0.9):
        state = checkpoint["ema"][str(decay)]
        assert state.keys() == module.model.state_dict().keys()  # plain keys, no "module."
        fresh = Regressor(seed=3).model
        fresh.load_state_dict(state)
        _assert_state_dict(_float_state(fresh), _float_state(ema.averaged_models[decay].module))
    for key, value in raw.items():
        assert torch.equal(checkpoint["state_dict"][key], value), key
    callback_state = checkpoint["callbacks"][ema.state_key]
    assert (
        callback_state["decays"] == [0.5, 0.9]
        and int(callback_state["averaged"]["0.9"]["n_averaged"]) == 3
    )
    assert callback_state["n_averaged"] == {"0.5": 3, "0.9": 3}


def test_validate_from_checkpoint_uses_the_stored_average(tmp_path):
    ema, module = EMA(decays=(0.5,)), Regressor()
    trainer = quiet_trainer(tmp_path, [ema], max_steps=3)
    trainer.fit(module, _loader())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    fresh_ema, fresh = EMA(decays=(0.5,)), Regressor(seed=5)
    quiet_trainer(tmp_path, [fresh_ema], max_steps=3, limit_val_batches=1).validate(
        fresh, _loader(num_batches=1), ckpt_path=tmp_path / "a.ckpt", verbose=False
    )
    _assert_state_dict(fresh.seen_in_validation[0], _float_state(ema.averaged_models[0.5].module))
    _assert_state_dict(_float_state(fresh.model), _float_state(module.model))  # raw afterwards


def test_state_loaded_before_and_after_the_averages_exist():
    source = EMA(decays=(0.5,))
    module = Regressor()
    source.on_fit_start(None, module)
    source.averaged_models[0.5].update_parameters(Regressor(seed=2).model)
    state = source.state_dict()
    late = EMA(decays=(0.5,))
    late.load_state_dict(state)  # before on_fit_start: stashed
    assert late.averaged_models == {}
    late.on_fit_start(None, Regressor(seed=4))
    early = EMA(decays=(0.5,))
    early.on_fit_start(None, Regressor(seed=4))
    early.load_state_dict(state)  # after (strategies that restore after setup): applied at once
    for target in (late, early):
        assert int(target.averaged_models[0.5].n_averaged) == 1
        _assert_state_dict(
            _float_state(target.averaged_models[0.5].module),
            _float_state(source.averaged_models[0.5].module),
        )


# ------------------------------------------------------------------------------ inputs
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decays": (1.5,)}, r"decay=1\.5.*\[0, 1\]"),
        ({"decays": ()}, r"decays=\(\) is empty"),
        ({"decays": (0.9, 0.9)}, r"repeats"),
        ({"decays": "0.9"}, r"decays='0\.9'"),
        ({"update_every_n_steps": 0}, r"update_every_n_steps=0"),
        ({"start_step": -1}, r"start_step=-1"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EMA(**kwargs)


def test_missing_attribute_names_the_choices():
    with pytest.raises(ValueError, match=r"attribute='net'.*\['model'\]"):
        EMA(attribute="net").on_fit_start(None, Regressor())


def test_find_and_dotted_attribute(tmp_path):
    ema = EMA(decays=(0.5,), attribute="model.0")
    trainer = quiet_trainer(tmp_path, [ema], max_steps=2)
    assert EMA.find(trainer) is ema
    assert EMA.find(quiet_trainer(tmp_path, [], max_steps=1)) is None
    module = Regressor()
    trainer.fit(module, _loader())
    assert set(ema.averaged_models[0.5].module.state_dict()) == {"weight", "bias"}


def test_a_second_fit_with_the_same_callback_keeps_averaging(tmp_path):
    ema, recorder, module = EMA(decays=(0.5,)), RawRecorder(), Regressor()
    quiet_trainer(tmp_path, [ema, recorder], max_steps=3).fit(module, _loader())
    quiet_trainer(tmp_path, [ema, recorder], max_steps=3).fit(
        module, _loader()
    )  # global_step restarts at 0
    assert len(recorder.history) == 3  # the recorder keys on global_step: second run not recorded
    assert int(ema.averaged_models[0.5].n_averaged) == 6
