"""`python -m diffusion.plot` and the `MetricsPlot` callback: a run's CSV log as one PNG."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from PIL import Image

from diffusion import plot
from diffusion.plot import main, plot_metrics, plot_run, smooth
from diffusion.training.callbacks import MetricsPlot
from diffusion.training.loggers import ResumableCSVLogger

from conftest import quiet_trainer

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)"),
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_PANELS = ("train_loss", "quarters", "bpd", "lr")
# The header train.py's csv logger writes on the digits quickstart (outputs/.../csv/metrics.csv).
HEADER = ["epoch", "lr-AdamW", "step", "test/bpd", "test/decoder_bpd", "test/prior_bpd",
          "train/grad_norm", "train/loss", "train/loss_q0", "train/loss_q1", "train/loss_q2",
          "train/loss_q3", "train/mse", "train/skipped_steps", "train/vb", "val/bpd", "val/decoder_bpd"]


def logger_rows(steps: int = 60, every: int = 5, steps_per_epoch: int = 6) -> list[dict[str, object]]:
    """Rows as Lightning logs them: a row per logged step (loss, lr, grad norm), a row per
    epoch (the quarter losses), a validation row every 20 steps and one test row."""
    rng = np.random.default_rng(0)
    rows: list[dict[str, object]] = []
    for step in range(1, steps + 1):
        epoch = (step - 1) // steps_per_epoch
        if step % every == 0:
            loss = 1.0 / np.sqrt(step) * (1 + 0.2 * rng.standard_normal() ** 2)
            rows.append({"epoch": epoch, "step": step, "train/loss": loss, "train/mse": loss,
                         "train/vb": 0.01, "train/grad_norm": 1.0, "train/skipped_steps": 0.0,
                         "lr-AdamW": 1e-4 * min(1.0, step / 20)})
        if step % steps_per_epoch == 0:
            rows.append({"epoch": epoch, "step": step,
                         **{f"train/loss_q{q}": (4 - q) / np.sqrt(step) for q in range(4)}})
        if step % 20 == 0:
            rows.append({"epoch": epoch, "step": step, "val/bpd": 6.0 - step / 20, "val/decoder_bpd": 1.3})
    rows.append({"epoch": epoch, "step": steps, "test/bpd": 3.05, "test/decoder_bpd": 1.2,
                 "test/prior_bpd": 1e-9})
    return rows


def write_csv(path, rows, header=HEADER) -> str:
    """A metrics.csv with ``header`` (Lightning writes every column, blank where unlogged)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def assert_png(path) -> tuple[int, int]:
    with open(path, "rb") as handle:
        assert handle.read(8) == PNG_SIGNATURE
    assert os.path.getsize(path) > 1000
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


# ----------------------------------------------------------------------- the function
def test_a_full_log_draws_every_panel_into_run_dir_metrics_png(tmp_path):
    run = tmp_path / "digits_quickstart" / "2026-01-01_00-00-00"
    write_csv(run / "csv" / "metrics.csv", logger_rows())
    drawn = plot_run(run)
    assert drawn.path == str(run / "metrics.png") and drawn.panels == ALL_PANELS
    assert assert_png(drawn.path) == (1200, 760)  # 2 x 2 panels
    # Written atomically: no temporary left beside it.
    assert sorted(os.listdir(run)) == ["csv", "metrics.png"]


def test_out_chooses_the_path_and_the_csv_folder_or_file_is_accepted(tmp_path):
    csv_path = write_csv(tmp_path / "run" / "csv" / "metrics.csv", logger_rows())
    out = tmp_path / "plots" / "new" / "run.png"  # folders are created
    assert plot_run(tmp_path / "run", out).path == str(out)
    assert_png(out)
    assert plot_run(tmp_path / "run" / "csv").path == str(tmp_path / "run" / "csv" / "metrics.png")
    assert plot_run(csv_path).path == str(tmp_path / "run" / "csv" / "metrics.png")


@pytest.mark.parametrize("columns, panels", [
    (["step", "train/loss", "val/bpd"], ("train_loss", "bpd")),
    (["step", "epoch", "lr-AdamW"], ("lr",)),
    (["step", "train/loss_q1", "train/loss_q3", "test/bpd"], ("quarters", "bpd")),
    # Columns in the header whose every value is blank are absent too.
    (HEADER, ("train_loss", "lr")),
])
def test_a_log_missing_some_columns_draws_the_rest(tmp_path, columns, panels):
    rows = logger_rows()
    if columns is HEADER:
        rows = [{k: v for k, v in row.items() if k in ("step", "train/loss", "lr-AdamW")} for row in rows]
    path = write_csv(tmp_path / "metrics.csv", rows, header=columns)
    drawn = plot_metrics(path, str(tmp_path / "out.png"))
    assert drawn.panels == panels
    width, height = assert_png(drawn.path)
    assert (width, height) == ((600, 400) if len(panels) == 1 else (1200, 400))


def test_non_finite_losses_are_left_out(tmp_path):
    rows = [{"step": 1, "train/loss": "nan"}, {"step": 2, "train/loss": "inf"}, {"step": 3, "train/loss": 0.5}]
    path = write_csv(tmp_path / "metrics.csv", rows, header=["step", "train/loss"])
    steps, values = plot.read_metrics(path)["train/loss"]
    assert steps.tolist() == [3.0] and values.tolist() == [0.5]
    assert plot_metrics(path, str(tmp_path / "out.png")).panels == ("train_loss",)


def test_smooth_is_a_debiased_exponential_moving_average():
    values = np.array([2.0, 4.0, 8.0])
    beta = 1 - 2 / (3 + 1)  # span 3
    expected = [2.0, (beta * (1 - beta) * 2 + (1 - beta) * 4) / (1 - beta**2)]
    np.testing.assert_allclose(smooth(values, 3)[:2], expected, rtol=1e-12)
    np.testing.assert_allclose(smooth(np.full(5, 0.3), 10), np.full(5, 0.3), rtol=1e-12)
    np.testing.assert_array_equal(smooth(values, 1), values)  # a span of one point: no smoothing


# ----------------------------------------------------------------------- errors
def one_error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_a_missing_csv_is_one_line_naming_the_path_and_the_fix(tmp_path, capsys):
    err = one_error_line(capsys, [str(tmp_path / "nowhere")])
    assert str(tmp_path / "nowhere" / "csv" / "metrics.csv") in err and "does not exist" in err
    assert "logger=csv" in err
    (tmp_path / "run").mkdir()
    assert "has no csv/metrics.csv" in one_error_line(capsys, [str(tmp_path / "run")])
    assert not (tmp_path / "run" / "metrics.png").exists()


@pytest.mark.parametrize("text, says", [
    ("", "has no rows"),
    ("epoch,step,train/loss\n", "has no rows"),
    ("a,b\n1,2\n", "no step column"),
    ("step,other/x\n1,2\n", "none of the plotted columns"),
])
def test_an_empty_or_foreign_csv_is_one_line(tmp_path, capsys, text, says):
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text(text)
    err = one_error_line(capsys, [str(tmp_path)])
    assert says in err and str(tmp_path / "csv" / "metrics.csv") in err
    assert not (tmp_path / "metrics.png").exists()


def test_out_naming_a_folder_is_one_line(tmp_path, capsys):
    write_csv(tmp_path / "csv" / "metrics.csv", logger_rows())
    err = one_error_line(capsys, [str(tmp_path), "--out", str(tmp_path / "csv")])
    assert "is a folder" in err and str(tmp_path / "csv" / "metrics.png") in err


def test_the_module_runs_as_a_command(tmp_path):
    """``python -m diffusion.plot``: the written PNG on success, one line and status 2 else."""
    write_csv(tmp_path / "run" / "csv" / "metrics.csv", logger_rows())
    command = [sys.executable, "-m", "diffusion.plot"]
    done = subprocess.run([*command, str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 'run' / 'metrics.png'}: train_loss, quarters, bpd, lr" in done.stderr
    failed = subprocess.run([*command, str(tmp_path / "none")], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and failed.stderr.startswith("error: no metrics CSV at ")
    assert "Traceback" not in failed.stderr


def test_help_names_the_csv_and_the_default_output(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "RUN_DIR/csv/metrics.csv" in text and "--out PATH" in text and "RUN_DIR/metrics.png" in text


# ----------------------------------------------------------------------- the callback
def tiny_module(keys: tuple[str, ...] = ("train/loss",)):
    """A linear model that logs its loss under ``keys`` each step and test/bpd in test."""

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            loss = self.layer(x).pow(2).mean()
            for key in keys:
                self.log(key, loss)
            return loss

        def test_step(self, batch, batch_idx):
            self.log("test/bpd", 3.0)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Module()


def loader():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)), batch_size=2)


def csv_trainer(tmp_path, callbacks, lr_monitor=True):
    """Six steps logged by train.py's csv logger (and the learning rate, as train.py does)."""
    logger = ResumableCSVLogger(save_dir=str(tmp_path), name="", version="csv")
    callbacks = [*callbacks, LearningRateMonitor(logging_interval="step")] if lr_monitor else callbacks
    return quiet_trainer(tmp_path, callbacks, max_steps=6, logger=logger, log_every_n_steps=1)


def test_the_callback_plots_when_fit_and_test_end(tmp_path):
    callback = MetricsPlot()
    trainer = csv_trainer(tmp_path, [callback])
    module = tiny_module()
    trainer.fit(module, train_dataloaders=loader())
    assert callback.drawn == ("train_loss", "lr")
    assert_png(tmp_path / "metrics.png")
    trainer.test(module, dataloaders=loader(), verbose=False)
    assert callback.drawn == ("train_loss", "bpd", "lr")  # redrawn with the test bound
    assert sorted(os.listdir(tmp_path)) == ["csv", "metrics.png"]


class Stop(Exception):
    pass


class StopAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Stop(f"a fault at step {self.step}")


def test_a_run_that_stops_on_an_error_is_plotted_up_to_it(tmp_path):
    callback = MetricsPlot()
    trainer = csv_trainer(tmp_path, [callback, StopAt(3)])
    with pytest.raises(Stop):
        trainer.fit(tiny_module(), train_dataloaders=loader())
    assert callback.drawn == ("train_loss", "lr")
    steps, _ = plot.read_metrics(str(tmp_path / "csv" / "metrics.csv"))["train/loss"]
    assert steps.tolist() == [0.0, 1.0, 2.0]


def test_a_run_that_stops_before_logging_a_metric_draws_nothing_and_says_nothing(tmp_path, caplog):
    callback = MetricsPlot()
    trainer = csv_trainer(tmp_path, [callback, StopAt(0)], lr_monitor=False)
    with pytest.raises(Stop), caplog.at_level(logging.WARNING, logger="diffusion.training.callbacks"):
        trainer.fit(tiny_module(), train_dataloaders=loader())
    assert callback.drawn == () and not [r for r in caplog.records if r.name == "diffusion.training.callbacks"]
    assert not (tmp_path / "csv" / "metrics.csv").exists() and not (tmp_path / "metrics.png").exists()


def test_a_plot_that_fails_is_a_warning_not_a_failed_run(tmp_path, caplog):
    (tmp_path / "blocked").write_text("a file where the plot's folder should be")
    cases = {  # the plot's path, the logged keys, whether the lr is logged
        "unwritable": (tmp_path / "blocked" / "m.png", ("train/loss",), True),
        "nothing to plot": (tmp_path / "m.png", ("other/x",), False),
    }
    for name, (path, keys, lr_monitor) in cases.items():
        callback = MetricsPlot(path=str(path))
        trainer = csv_trainer(tmp_path / name, [callback], lr_monitor)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="diffusion.training.callbacks"):
            trainer.fit(tiny_module(keys), train_dataloaders=loader())
        assert trainer.global_step == 6 and callback.drawn == () and not path.exists()
        warnings = [r.message for r in caplog.records if r.name == "diffusion.training.callbacks"]
        assert [w.split(" not drawn")[0] for w in warnings] == [f"metrics plot {path}"], name


def test_the_callback_draws_nothing_without_a_csv_logger(tmp_path):
    callback = MetricsPlot()
    trainer = quiet_trainer(tmp_path, [callback], max_steps=2)  # logger=False
    trainer.fit(tiny_module(), train_dataloaders=loader())
    assert callback.drawn == () and not (tmp_path / "metrics.png").exists()
