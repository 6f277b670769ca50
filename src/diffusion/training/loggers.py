"""A CSV logger that survives resumes and full disks: earlier rows are kept, replayed steps
replaced, and the file is only ever replaced whole (temporary file, fsync, rename).

Lightning's CSVLogger deletes ``metrics.csv`` when its folder is reused, so a run resumed
in its own output folder would lose everything logged before the interruption. Here the
previous rows are kept, and rows at or after the first step the resumed run logs (those
the interrupted run logged after its last checkpoint, which are computed again) are
dropped, so the file gains no duplicate rows.
"""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from diffusion.utils.atomic import atomic_write


class ResumableExperimentWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        self._previous: list[dict[str, str]] = []
        if os.path.isfile(path):
            with open(path, newline="") as handle:
                self._previous = list(csv.DictReader(handle))
        super().__init__(log_dir)
        self._merged = not self._previous

    def _check_log_dir_exists(self) -> None:
        pass  # the parent deletes metrics.csv here; it stays until the merged file replaces it

    def save(self) -> None:
        """Rewrite metrics.csv whole and atomically (`atomic_write`): a full disk or a crash
        mid-write leaves the previous file with every earlier row. (Lightning appends in
        place, and rewrites the file in place when a column appears.)"""
        if not self._merged and self.metrics:
            self._merge_previous(min(int(m["step"]) for m in self.metrics))
        if not self.metrics:
            return
        self._record_new_keys()
        rows = []
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as handle:
                rows = list(csv.DictReader(handle))
        try:
            with atomic_write(self.metrics_file_path, "w") as handle:
                writer = csv.DictWriter(handle, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows([*rows, *self.metrics])
        except OSError as err:  # name the file, not the temporary one
            raise OSError(err.errno, err.strerror or str(err), self.metrics_file_path) from err
        self.metrics = []

    def _merge_previous(self, first_new_step: int) -> None:
        kept = [row for row in self._previous if row.get("step") and int(row["step"]) < first_new_step]
        if kept:
            keys = sorted(set().union(*(row.keys() for row in kept)) | {"step"})
            with atomic_write(self.metrics_file_path, "w") as handle:
                writer = csv.DictWriter(handle, fieldnames=keys)
                writer.writeheader()
                writer.writerows(kept)
            self.metrics_keys = keys
        elif os.path.exists(self.metrics_file_path):
            os.remove(self.metrics_file_path)  # every earlier row is logged again
        self._merged = True


class ResumableCSVLogger(CSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` that appends across resumes (see module doc)."""

    @property
    def experiment(self) -> ResumableExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ResumableExperimentWriter(log_dir=self.log_dir)
        return self._experiment
