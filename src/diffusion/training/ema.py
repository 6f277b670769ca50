"""`EMA`: exponential moving averages of a sub-module's weights, as a Lightning callback.

Diffusion models are sampled with an EMA of their weights (DDPM sec. 4, arXiv 2006.11239,
decay 0.9999; IDDPM, arXiv 2102.09672, the same). The averaging itself is
`torch.optim.swa_utils.AveragedModel` with one foreach lerp per update (`_ema_lerp`), one
per rate; this callback only decides *when* to update, keeps the averages in
the checkpoint, and swaps them into the live module for validation, testing and sampling.

Nothing here depends on the rest of the project: any LightningModule works.

Notation:

    ==================  =====================================================
    code                meaning
    ==================  =====================================================
    ``decay``           d in  ema <- d * ema + (1 - d) * w
    ``n_averaged``      number of updates folded into the average so far
    ``global_step``     k, optimizer steps taken (1 after the first step)
    ==================  =====================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.optim.swa_utils import AveragedModel

from diffusion.utils.checks import require_int

CHECKPOINT_KEY = "ema"


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters then buffers, detached, in the order `AveragedModel.update_parameters` uses."""
    return [t.detach() for t in (*module.parameters(), *module.buffers())]


def _names(module: nn.Module) -> list[str]:
    """The state-dict names of `_tensors(module)`, in the same order."""
    return [name for name, _ in (*module.named_parameters(), *module.named_buffers())]


def _ema_lerp(decay: float, callback: EMA):
    """The `AveragedModel` update ema <- ema + (1 - d)(w - ema), as one foreach lerp.

    When the module exposes ``step_applied`` (a 0-d bool device tensor, False where the
    optimizer skipped a non-finite step), the rate is multiplied by it on the device, so
    a skipped step leaves the averages untouched without a host sync.
    """

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any) -> None:
        del num_averaged  # a constant-rate EMA does not depend on it
        if averaged[0].is_floating_point():
            applied = callback.step_applied
            rate = 1.0 - decay
            weight = rate if applied is None else applied.to(averaged[0]) * rate
            torch._foreach_lerp_(averaged, current, weight)
        else:  # integer buffers (e.g. counters) follow the module
            torch._foreach_copy_(averaged, current)

    return update


def submodule(pl_module: nn.Module, attribute: str, owner: str = "EMA") -> nn.Module:
    """``pl_module.<attribute>`` (a dotted path); a ValueError naming ``owner``, the attribute
    and the sub-modules there are, when it is not a sub-module."""
    module: Any = pl_module
    for part in attribute.split("."):
        if not isinstance(getattr(module, part, None), nn.Module):
            children = [name for name, _ in module.named_children()] if isinstance(module, nn.Module) else []
            raise ValueError(
                f"{owner}: attribute={attribute!r}: {type(module).__name__} has no sub-module "
                f"{part!r}; its sub-modules are {children}"
            )
        module = getattr(module, part)
    return module


@torch.no_grad()
def _copy_(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """dst[i] <- src[i] for every i; one fused kernel when everything shares a device."""
    if len(dst) != len(src):
        raise RuntimeError(f"EMA: cannot copy {len(src)} tensors into {len(dst)}")
    if not dst:
        return
    if len({t.device for t in (*dst, *src)}) == 1:
        torch._foreach_copy_(dst, src)
    else:  # e.g. the module was moved to the CPU at the end of fit, the averages were not
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)


class EMA(L.Callback):
    """Keeps exponential moving averages (EMA) of ``pl_module.<attribute>``, one per decay.

    After optimizer step k (``trainer.global_step == k``, 1-based) the averages are updated
    when ``k > start_step`` and ``k % update_every_n_steps == 0``. The first update copies
    the weights, later ones compute ``ema <- decay * ema + (1 - decay) * w`` for parameters
    and buffers alike (`AveragedModel` semantics; improved-diffusion instead starts from the
    initial weights). With gradient accumulation the averages move once per optimizer step,
    not once per batch.

    The averages are saved twice in each checkpoint: in the callback state (with
    ``n_averaged``, so that ``trainer.fit(ckpt_path=...)`` resumes exactly), and as plain
    state dicts of the averaged module under ``checkpoint["ema"][str(decay)]``, so that a
    script can load them without building the callback. Both refer to the same storages,
    which ``torch.save`` writes once.

    With ``use_for_validation=True`` the first rate's weights are swapped into the module
    for validation and test loops, and the raw weights are put back afterwards. Before the
    first update (the sanity check) there is no average yet and the raw weights are used.

    Args:
        decays: one EMA per rate, each in [0, 1]. The first is the one used for validation,
            testing and `swapped` without an explicit ``decay``.
        attribute: the sub-module to average, as a (dotted) attribute of the LightningModule.
        update_every_n_steps: update after every n-th optimizer step.
        start_step: no update before optimizer step ``start_step + 1``.
        use_for_validation: evaluate with the EMA weights of the first rate.

    Example::

        import lightning as L
        import torch
        from diffusion.training.ema import EMA

        class Regressor(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.model = torch.nn.Linear(8, 1)

            def training_step(self, batch, batch_idx):
                x, y = batch
                return torch.nn.functional.mse_loss(self.model(x), y)

            def configure_optimizers(self):
                return torch.optim.Adam(self.model.parameters(), lr=1e-3)

        ema = EMA(decays=(0.999, 0.9999))
        trainer = L.Trainer(max_steps=1000, callbacks=[ema])
        trainer.fit(Regressor(), train_dataloaders=loader)
        with ema.swapped(trainer.lightning_module, decay=0.9999):
            predictions = trainer.lightning_module.model(x)   # EMA weights
        # outside the block the raw weights are back
    """

    def __init__(
        self,
        decays: Sequence[float] = (0.9999,),
        attribute: str = "model",
        update_every_n_steps: int = 1,
        start_step: int = 0,
        use_for_validation: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(decays, str):
            raise ValueError(f"decays={decays!r} must be a number or a sequence of numbers in [0, 1]")
        decays = (decays,) if isinstance(decays, (int, float)) else tuple(decays)
        if not decays:
            raise ValueError("decays=() is empty; give at least one rate in [0, 1]")
        for decay in decays:
            if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
                raise ValueError(f"decays={list(decays)}: decay={decay!r} is not a number in [0, 1]")
        if len(set(map(float, decays))) != len(decays):
            raise ValueError(f"decays={list(decays)} repeats a rate; each rate must be distinct")
        require_int("update_every_n_steps", update_every_n_steps, 1)
        require_int("start_step", start_step, 0)
        if not isinstance(attribute, str) or not attribute:
            raise ValueError(f"attribute={attribute!r} must name a sub-module, e.g. 'model'")
        self.decays = tuple(float(d) for d in decays)
        self.attribute = attribute
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step
        self.use_for_validation = use_for_validation
        self.averaged_models: dict[float, AveragedModel] = {}
        self._last_step = 0  # the global_step whose update was already considered
        self._pending: dict[str, Any] | None = None  # loaded before the averages existed
        self._backups: list[list[torch.Tensor]] = []  # raw weights held by open swaps
        self._eval_swap: contextlib.ExitStack | None = None
        self.step_applied: torch.Tensor | None = None  # the module's flag for the update in progress

    # ------------------------------------------------------------------------ lookup
    @staticmethod
    def find(trainer: L.Trainer | None) -> EMA | None:
        """The trainer's first `EMA` callback, or None."""
        for callback in getattr(trainer, "callbacks", None) or ():
            if isinstance(callback, EMA):
                return callback
        return None

    @property
    def state_key(self) -> str:
        # The attribute (not the rates) identifies the state, so a resume with other rates
        # still finds it and keeps the rates the two runs share.
        return self._generate_state_key(attribute=self.attribute)

    def target(self, pl_module: L.LightningModule) -> nn.Module:
        """The averaged sub-module ``pl_module.<attribute>``."""
        return submodule(pl_module, self.attribute, type(self).__name__)

    def _averaged(self, decay: float | None) -> AveragedModel | None:
        if decay is None:
            decay = self.decays[0]
        if float(decay) not in self.decays:
            raise ValueError(f"EMA: decay={decay!r} is not tracked; the rates are {list(self.decays)}")
        return self.averaged_models.get(float(decay))

    # ---------------------------------------------------------------- create / update
    def _ensure_averages(self, pl_module: L.LightningModule) -> None:
        """Create the averages on the module's device (once), then apply a stashed state."""
        module = self.target(pl_module)
        if not self.averaged_models:
            for decay in self.decays:
                # deepcopy keeps the module's device; n_averaged stays on the CPU, so the
                # `n_averaged == 0` test inside update_parameters never syncs the GPU.
                averaged = AveragedModel(module, multi_avg_fn=_ema_lerp(decay, self), use_buffers=True)
                averaged.module.requires_grad_(False)
                self.averaged_models[decay] = averaged
        else:  # a second fit with the same callback: follow the module's device
            device = next(iter(_tensors(module)), torch.empty(0)).device
            for averaged in self.averaged_models.values():
                averaged.module.to(device)
        if self._pending is not None:
            state, self._pending = self._pending, None
            self._apply_state(state)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After strategy.setup, so the copy lands on the module's final device and dtype.
        self._ensure_averages(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The loops are restored by now: steps up to global_step are already averaged in
        # (checkpoints are written after this callback's on_train_batch_end).
        self._last_step = trainer.global_step

    def should_update(self, step: int) -> bool:
        """Whether to fold in the weights after optimizer step ``step`` (1-based)."""
        return step > self.start_step and step % self.update_every_n_steps == 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step <= self._last_step:  # accumulating gradients: no optimizer step yet
            return
        self._last_step = step
        if self.should_update(step):
            module = self.target(pl_module)
            self.step_applied = getattr(pl_module, "step_applied", None)
            try:
                for averaged in self.averaged_models.values():
                    averaged.update_parameters(module)
            finally:
                self.step_applied = None

    # ----------------------------------------------------------------------- swapping
    @contextlib.contextmanager
    def swapped(self, pl_module: L.LightningModule, decay: float | None = None) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights of ``decay`` (default: the first rate) into
        ``pl_module.<attribute>``; the raw weights are restored exactly on exit.

        A no-op while that average holds no update yet (before the first optimizer step),
        so the raw weights are used then. Yields the (swapped) sub-module.
        """
        averaged = self._averaged(decay)
        module = self.target(pl_module)
        if averaged is None or int(averaged.n_averaged) == 0:
            yield module
            return
        current = _tensors(module)
        backup = [t.clone() for t in current]
        _copy_(current, _tensors(averaged.module))
        self._backups.append(backup)
        try:
            yield module
        finally:
            self._backups = [b for b in self._backups if b is not backup]
            _copy_(current, backup)

    def _enter_eval_swap(self, pl_module: L.LightningModule) -> None:
        if not self.use_for_validation or self._eval_swap is not None:
            return
        if not self.averaged_models and self._pending is not None:
            self._ensure_averages(pl_module)  # trainer.validate/test(ckpt_path=...)
        stack = contextlib.ExitStack()
        stack.enter_context(self.swapped(pl_module))
        self._eval_swap = stack

    def _exit_eval_swap(self) -> None:
        if self._eval_swap is not None:
            stack, self._eval_swap = self._eval_swap, None
            stack.close()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._enter_eval_swap(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._exit_eval_swap()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._enter_eval_swap(pl_module)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._exit_eval_swap()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._exit_eval_swap()  # never leave the EMA weights in the module as if they were raw

    # -------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.averaged_models:
            averaged = {str(d): avg.state_dict() for d, avg in self.averaged_models.items()}
        else:  # loaded for validate/test but never materialised: pass it on unchanged
            averaged = dict((self._pending or {}).get("averaged", {}))
        return {
            "decays": list(self.decays),
            "attribute": self.attribute,
            "last_step": self._last_step,
            "averaged": averaged,  # str(decay) -> AveragedModel.state_dict(): what resume loads
            "n_averaged": {key: int(state["n_averaged"]) for key, state in averaged.items()},  # for readers
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning 2.6 calls this before ``on_fit_start`` on a resume (and after it for
        strategies that restore after setup); the state waits until the averages exist."""
        self._last_step = int(state_dict.get("last_step", 0))
        if self.averaged_models:
            self._apply_state(state_dict)
        else:
            self._pending = state_dict

    def _apply_state(self, state: dict[str, Any]) -> None:
        saved = state.get("averaged", {})
        for decay, averaged in self.averaged_models.items():
            if str(decay) in saved:
                averaged.load_state_dict(saved[str(decay)])
            else:
                rank_zero_warn(
                    f"EMA: the checkpoint has no average for decay={decay} (it has {sorted(saved)}); "
                    "this rate starts again from the current weights"
                )
        dropped = sorted(set(saved) - {str(d) for d in self.decays})
        if dropped:
            rank_zero_warn(f"EMA: dropping the checkpoint's averages for decays {dropped}; tracking {list(self.decays)}")

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        exported = checkpoint.setdefault(CHECKPOINT_KEY, {})
        for key, state in self.state_dict()["averaged"].items():
            exported[key] = {
                name[len("module."):]: value for name, value in state.items() if name.startswith("module.")
            }
        if self._backups and "state_dict" in checkpoint:
            # Saved while the EMA weights are swapped in: keep the raw ones in "state_dict".
            raw = self._backups[0]
            names = _names(self.target(pl_module))
            model_state = checkpoint["state_dict"]
            for name, value in zip(names, raw, strict=True):
                key = f"{self.attribute}.{name}"
                if key in model_state:
                    model_state[key] = value
