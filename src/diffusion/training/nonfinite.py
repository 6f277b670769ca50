"""Non-finite training steps: counted on the device, reported to the host a step or two late.

A NaN or inf loss (or gradient) must neither reach the weights nor cost a host-device
synchronisation per step. The decision to skip is therefore taken on the device (a fused
optimizer's ``found_inf``, or the mixed-precision scaler's), and this guard only keeps
the bookkeeping there too: how many steps were skipped, how many in a row, and the step
and timesteps of the first and of the latest one. The host reads that state through an
asynchronous copy that it collects once it has arrived (`poll` never waits), so the
warning or the stop comes at most a few steps after the fault, with the fault's details.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffusion.utils.checks import require_int

POLICIES = ("skip", "stop")

# Layout of the packed int64 device state: four counters, then two rows of timesteps.
_COUNT, _CONSECUTIVE, _FIRST_STEP, _LAST_STEP = range(4)
_HEAD = 4


class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite loss or gradient (``module.nonfinite.policy``)."""


@dataclass(frozen=True)
class NonFiniteReport:
    """The guard's state as of some step: totals and the first and latest bad steps."""

    count: int
    consecutive: int
    first_step: int
    first_t: list[int]
    last_step: int
    last_t: list[int]


class NonFiniteGuard:
    """Device-side count of skipped steps, with a policy for what the host does about them.

    Args:
        policy: ``"skip"`` (warn and go on; the step's update was skipped) or ``"stop"``
            (raise `NonFiniteLossError` naming the step, its timesteps and the last good
            checkpoint).
        max_consecutive: under ``"skip"``, stop anyway after this many skipped steps in a
            row: the model has diverged and skipping only burns compute.
    """

    def __init__(self, policy: str = "skip", max_consecutive: int = 20) -> None:
        if policy not in POLICIES:
            raise ValueError(f"module.nonfinite.policy={policy!r} is not one of {POLICIES}")
        require_int("module.nonfinite.max_consecutive", max_consecutive, 1)
        self.policy = policy
        self.max_consecutive = max_consecutive
        self.state: torch.Tensor | None = None  # int64 (4 + 2W,) on the training device
        self.width = 0  # W, the widest batch seen
        self.reported = 0  # bad steps the host has already acted on
        self._host: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None

    # ------------------------------------------------------------------ device side
    def _ensure_state(self, t: torch.Tensor) -> torch.Tensor:
        """The state on ``t``'s device, with rows at least as wide as ``t`` (on the device)."""
        width = max(self.width, t.numel())
        if self.state is None:
            state = torch.full((_HEAD + 2 * width,), -1, dtype=torch.int64, device=t.device)
            state[_COUNT] = state[_CONSECUTIVE] = 0
        elif self.state.device != t.device or width != self.width:
            old, w = self.state.to(t.device), self.width
            rows = [F.pad(old[_HEAD + i * w:_HEAD + (i + 1) * w], (0, width - w), value=-1) for i in (0, 1)]
            state = torch.cat([old[:_HEAD], *rows])
        else:
            return self.state
        self.state, self.width = state, width
        self._host = self._event = None
        return state

    @torch.no_grad()
    def record(self, ok: torch.Tensor, t: torch.Tensor, step: int) -> None:
        """Fold in one step: ``ok`` is a 0-d bool tensor (False: the update was skipped),
        ``t`` the batch's timesteps, ``step`` the global step. Device ops only."""
        state = self._ensure_state(t)
        bad = (~ok).to(torch.int64)
        first = bad * (state[_COUNT] == 0)  # 1 only for the first bad step ever
        t_row = F.pad(t.to(torch.int64).reshape(-1), (0, self.width - t.numel()), value=-1)
        first_t = state[_HEAD:_HEAD + self.width]
        last_t = state[_HEAD + self.width:]
        first_t.copy_(torch.where(first.bool(), t_row, first_t))
        last_t.copy_(torch.where(bad.bool(), t_row, last_t))
        state[_FIRST_STEP] = torch.where(first.bool(), step, state[_FIRST_STEP])
        state[_LAST_STEP] = torch.where(bad.bool(), step, state[_LAST_STEP])
        state[_CONSECUTIVE] = (state[_CONSECUTIVE] + 1) * bad
        state[_COUNT] += bad

    @property
    def count(self) -> torch.Tensor:
        """Skipped steps so far, a 0-d device tensor (log it: no sync)."""
        if self.state is None:
            return torch.zeros((), dtype=torch.int64)
        return self.state[_COUNT]

    # -------------------------------------------------------------------- host side
    def unpack(self, values: list[int]) -> NonFiniteReport:
        width = (len(values) - _HEAD) // 2
        rows = values[_HEAD:_HEAD + width], values[_HEAD + width:]
        first_t, last_t = ([v for v in row if v >= 0] for row in rows)
        return NonFiniteReport(
            count=values[_COUNT], consecutive=values[_CONSECUTIVE], first_step=values[_FIRST_STEP],
            first_t=first_t, last_step=values[_LAST_STEP], last_t=last_t,
        )

    def poll(self) -> NonFiniteReport | None:
        """The state as of an earlier step if its copy has arrived, else None; never waits.

        On the CPU the copy is immediate, so the report is of the current step. On CUDA a
        copy into pinned memory is queued behind the step's kernels and collected by a later
        call once its event has completed.
        """
        if self.state is None:
            return None
        if self.state.device.type != "cuda":
            return self.unpack(self.state.tolist())
        report = None
        if self._event is not None:
            if not self._event.query():
                return None
            report = self.unpack(self._host.tolist())
        if self._host is None:
            self._host = torch.empty_like(self.state, device="cpu").pin_memory()
        self._host.copy_(self.state, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()
        return report

    def check(self, report: NonFiniteReport | None, last_checkpoint: str | None) -> str | None:
        """Act on a report: raise `NonFiniteLossError` under ``"stop"`` or after too many
        skips in a row; otherwise return a warning about the newly skipped steps, or None."""
        if report is None or report.count <= self.reported:
            return None
        new, self.reported = report.count - self.reported, report.count
        saved = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint written yet"
        if self.policy == "stop":
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {report.first_step}, batch timesteps t = "
                f"{report.first_t}; its update was skipped, so the weights are still finite; {saved} "
                "(module.nonfinite.policy=stop; policy=skip counts such steps and goes on)"
            )
        if report.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{report.consecutive} non-finite steps in a row (module.nonfinite.max_consecutive="
                f"{self.max_consecutive}), the latest at step {report.last_step}, batch timesteps t = "
                f"{report.last_t}; the model has diverged; {saved}"
            )
        return (
            f"skipped {new} step(s) with a non-finite loss or gradient, the latest at step "
            f"{report.last_step} (batch timesteps t = {report.last_t}); {report.count} skipped in all"
        )

    def latest(self) -> NonFiniteReport | None:
        """The current state, waiting for the device (for checkpoints and the end of a run)."""
        return None if self.state is None else self.unpack(self.state.tolist())

    def state_dict(self) -> dict:
        return {"values": [] if self.state is None else self.state.tolist(), "reported": self.reported}

    def load_state_dict(self, state: dict) -> None:
        values = list(state.get("values") or [])
        self.reported = int(state.get("reported", 0))
        if values:
            self.state = torch.tensor(values, dtype=torch.int64)
            self.width = (len(values) - _HEAD) // 2
            self._host = self._event = None
