"""``python -m diffusion.plot RUN_DIR``: one PNG of a training run's loss and metrics.

Reads the CSV log that train.py's csv logger (``logger=csv``, the default) writes to
``RUN_DIR/csv/metrics.csv`` and draws, in one figure, a panel for each of

========== ======================================= =========================================
panel      columns                                 drawn as
========== ======================================= =========================================
train_loss ``train/loss``                          the logged steps as light points, a
                                                   smoothed line (debiased EMA) on top
quarters   ``train/loss_q0`` .. ``train/loss_q3``  one line per quarter of the t range (the
                                                   epoch means `DiffusionModule` logs)
bpd        ``val/bpd``, ``test/bpd``               validation bits/dim; the test bound as a
                                                   marker at its step
lr         ``lr-*`` (LearningRateMonitor's keys)   one line per optimizer / parameter group
========== ======================================= =========================================

A panel whose columns are absent (or hold no finite value) is left out. The figure is
written atomically (`diffusion.utils.atomic`) to ``RUN_DIR/metrics.png`` or ``--out PATH``,
through matplotlib's Agg canvas (no display, and no change to pyplot's global backend).
`MetricsPlot` (training/callbacks.py) draws the same figure when a run's fit and test end.

A missing or empty CSV, or one with nothing to draw, ends the command with one line,
``error: <what is wrong> <how to fix it>``, and exit status 2, as the other entry points do
(`diffusion.jobs.errors`, a room above this one).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from diffusion.utils.atomic import atomic_write
from diffusion.utils.checks import UnwritableError
from diffusion.utils.errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Where train.py's csv logger writes (configs/logger/csv.yaml: save_dir=output_dir, version=csv).
CSV_RELPATH = os.path.join("csv", "metrics.csv")
DEFAULT_FILENAME = "metrics.png"
LOSS = "train/loss"
QUARTER_LOSSES = tuple(f"train/loss_q{q}" for q in range(4))
VAL_BPD, TEST_BPD = "val/bpd", "test/bpd"
# LearningRateMonitor's keys: lr-<optimizer class>, with /pg<i> per parameter group.
LR_PREFIX = "lr-"
QUARTER_LABELS = ("q0: t < T/4", "q1: T/4 ≤ t < T/2", "q2: T/2 ≤ t < 3T/4", "q3: t ≥ 3T/4")
RUN_HINT = ("pass the output folder of a train.py run logged with the csv logger (logger=csv, "
            "the default), e.g. outputs/digits_quickstart/<date>_<time>")

Series = tuple[np.ndarray, np.ndarray]  # (steps, values), sorted by step, finite values only


class DrawnPlot(NamedTuple):
    path: str                 # the PNG written
    panels: tuple[str, ...]   # the panels drawn, in order (names of PANELS)


# ------------------------------------------------------------------------- reading
def find_metrics_csv(run_dir: str | os.PathLike) -> str:
    """The metrics CSV of a run: ``RUN_DIR/csv/metrics.csv``; also accepted, the csv folder
    itself or the CSV file. Raises a UserError naming the path looked at."""
    run_dir = os.fspath(run_dir)
    if os.path.isfile(run_dir):
        return run_dir
    for candidate in (os.path.join(run_dir, CSV_RELPATH), os.path.join(run_dir, "metrics.csv")):
        if os.path.isfile(candidate):
            return candidate
    expected = os.path.join(run_dir, CSV_RELPATH)
    where = "it does not exist" if not os.path.exists(run_dir) else "it has no csv/metrics.csv"
    raise UserError(f"no metrics CSV at {expected} ({run_dir}: {where}); {RUN_HINT}")


def read_metrics(path: str) -> dict[str, Series]:
    """Every column of a Lightning metrics CSV as (steps, values), keeping the rows where
    it has a finite value (a skipped step's NaN loss is left out)."""
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"cannot read the metrics CSV {path} ({err}); {RUN_HINT}") from None
    if not rows:
        raise UserError(f"the metrics CSV {path} has no rows (the run logged nothing yet); plot it "
                        "after the first logged step (trainer.log_every_n_steps), or pass another run")
    if "step" not in rows[0]:
        raise UserError(f"{path} has no step column: not a Lightning CSVLogger metrics file; {RUN_HINT}")
    return {key: _column(rows, key) for key in rows[0] if key not in ("step", "epoch")}


def _column(rows: list[dict[str, str]], key: str) -> Series:
    pairs = [(_number(row["step"]), _number(row.get(key))) for row in rows]
    pairs = sorted((s, v) for s, v in pairs if math.isfinite(s) and math.isfinite(v))
    steps, values = zip(*pairs, strict=True) if pairs else ((), ())
    return np.asarray(steps, np.float64), np.asarray(values, np.float64)


def _number(text: str | None) -> float:
    try:
        return float(text) if text else math.nan
    except ValueError:
        return math.nan


# ------------------------------------------------------------------------- panels
def panel_columns(columns: Sequence[str]) -> dict[str, list[str]]:
    """The columns each panel draws, in panel order."""
    return {
        "train_loss": [LOSS],
        "quarters": list(QUARTER_LOSSES),
        "bpd": [VAL_BPD, TEST_BPD],
        "lr": sorted(c for c in columns if c.startswith(LR_PREFIX)),
    }


def smooth(values: np.ndarray, window: float) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average of span ``window`` points,
    debiased (divided by 1 − β^(i+1)) so that it starts at the first value, not at 0."""
    beta = 1.0 - 2.0 / (max(window, 1.0) + 1.0)
    out, mean = np.empty_like(values), 0.0
    for i, value in enumerate(values):
        mean = beta * mean + (1.0 - beta) * value
        out[i] = mean / (1.0 - beta ** (i + 1))
    return out


def _log_scale_if_positive(ax, series: Sequence[Series]) -> None:
    if all(values.size and values.min() > 0 for _, values in series):
        ax.set_yscale("log")


def draw_train_loss(ax, data: dict[str, Series]) -> None:
    steps, values = data[LOSS]
    ax.plot(steps, values, ".", color="tab:blue", alpha=0.35, markersize=4, label="logged steps")
    ax.plot(steps, smooth(values, max(5.0, len(values) / 25)), color="navy", linewidth=1.8, label="smoothed")
    _log_scale_if_positive(ax, [data[LOSS]])
    ax.set(title="training loss", ylabel=LOSS)


def draw_quarters(ax, data: dict[str, Series]) -> None:
    drawn = [(key, label) for key, label in zip(QUARTER_LOSSES, QUARTER_LABELS, strict=True) if key in data]
    for key, label in drawn:
        ax.plot(*data[key], label=label)
    _log_scale_if_positive(ax, [data[key] for key, _ in drawn])
    ax.set(title="training loss by quarter of the t range", ylabel="train/loss_q*")


def draw_bpd(ax, data: dict[str, Series]) -> None:
    if VAL_BPD in data:
        ax.plot(*data[VAL_BPD], "o-", label="val/bpd")
    if TEST_BPD in data:
        steps, values = data[TEST_BPD]
        ax.plot(steps[-1:], values[-1:], "*", color="tab:red", markersize=12,
                label=f"test/bpd {values[-1]:.4f}")
    ax.set(title="bits/dim (variational bound)", ylabel="bits/dim")


def draw_lr(ax, data: dict[str, Series]) -> None:
    for key in sorted(k for k in data if k.startswith(LR_PREFIX)):
        ax.plot(*data[key], label=key)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set(title="learning rate", ylabel="lr")


PANELS: dict[str, Callable[..., None]] = {
    "train_loss": draw_train_loss, "quarters": draw_quarters, "bpd": draw_bpd, "lr": draw_lr,
}


# ------------------------------------------------------------------------- drawing
def plot_metrics(csv_path: str, out: str, title: str | None = None) -> DrawnPlot:
    """Draw the panels whose columns ``csv_path`` holds into one PNG at ``out`` (atomically).
    Raises a UserError if the CSV is missing or empty, or holds none of the panels' columns."""
    if not os.path.isfile(csv_path):
        raise UserError(f"no metrics CSV at {csv_path}; {RUN_HINT}")
    metrics = read_metrics(csv_path)
    present = {key: series for key, series in metrics.items() if series[1].size}
    wanted = panel_columns(list(metrics))
    panels = [name for name, columns in wanted.items() if any(c in present for c in columns)]
    if not panels:
        expected = ", ".join([LOSS, *QUARTER_LOSSES, VAL_BPD, TEST_BPD, f"{LR_PREFIX}*"])
        raise UserError(f"the metrics CSV {csv_path} has none of the plotted columns ({expected}) "
                        f"with a value; {RUN_HINT}")
    if os.path.isdir(out):
        raise UserError(f"the plot's path {out} is a folder; name the PNG file to write, "
                        f"e.g. {os.path.join(out, DEFAULT_FILENAME)}")
    figure = draw_figure(panels, present, title or csv_path)
    try:
        with atomic_write(out) as handle:
            figure.savefig(handle, format="png")
    except OSError as err:
        raise UnwritableError(f"cannot write the plot {out} ({err.strerror or err}); "
                              "free space, fix the folder's permissions or choose another path") from None
    return DrawnPlot(out, tuple(panels))


def draw_figure(panels: Sequence[str], data: dict[str, Series], title: str) -> Figure:
    """A matplotlib Figure on an Agg canvas, two panels a row, every panel against step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415  (0.5 s: on use)
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.ticker import EngFormatter  # noqa: PLC0415

    ncols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    # Fixed margins (in inches): a layout engine measures every tick label, doubling the time.
    width, height = 6.0 * ncols, 3.6 * nrows + 0.4
    figure = Figure(figsize=(width, height), dpi=100)
    figure.subplots_adjust(left=0.8 / width, right=1 - 0.2 / width, bottom=0.5 / height,
                           top=1 - 0.6 / height, wspace=0.25, hspace=0.38)
    FigureCanvasAgg(figure)
    for i, name in enumerate(panels):
        ax = figure.add_subplot(nrows, ncols, i + 1)
        PANELS[name](ax, data)
        ax.set_xlabel("step")
        if ax.get_xlim()[1] >= 1e4:
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 200k, not 200000
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle(title, fontsize="medium")
    return figure


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> DrawnPlot:
    """`plot_metrics` for a train.py output folder (or its csv folder, or the CSV file);
    ``out`` defaults to metrics.png in that folder (beside the file, for a file)."""
    run_dir = os.fspath(run_dir)
    csv_path = find_metrics_csv(run_dir)
    folder = os.path.dirname(run_dir) if os.path.isfile(run_dir) else run_dir
    out = os.fspath(out) if out is not None else os.path.join(folder, DEFAULT_FILENAME)
    return plot_metrics(csv_path, out, title=run_title(folder))


def run_title(folder: str) -> str:
    """The figure's title: the run folder's last two parts (``digits_quickstart/<date>_<time>``)."""
    parts = os.path.abspath(folder).split(os.sep)
    return "/".join(p for p in parts[-2:] if p)


# ------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffusion.plot",
        description="Draw a training run's loss and metrics from its CSV log "
                    "(RUN_DIR/csv/metrics.csv) into one PNG: the training loss (logged steps and "
                    "a smoothed line), the loss per quarter of the t range, validation (and test) "
                    "bits/dim and the learning rate. Panels whose columns the log lacks are left out.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="a train.py output folder (outputs/<experiment>/<date>_<time>), "
                             "or its csv folder, or the metrics.csv file")
    parser.add_argument("--out", metavar="PATH", default=None,
                        help=f"the PNG to write (default: RUN_DIR/{DEFAULT_FILENAME}; beside "
                             "the file when RUN_DIR is the CSV file)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """``python -m diffusion.plot RUN_DIR [--out PATH]``: prints the PNG's path and its panels;
    bad input prints ``error: <message>`` and exits with status 2."""
    args = build_parser().parse_args(argv)
    try:
        drawn = plot_run(args.run_dir, args.out)
    except UserError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {drawn.path}: {', '.join(drawn.panels)}", file=sys.stderr)


if __name__ == "__main__":
    main()
