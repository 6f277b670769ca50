"""The rooms of src/diffusion/ import only downward (README, "Architecture").

Every module belongs to a room (its first folder under src/diffusion/, or its own name for
a top-level module). `ALLOWED` says which rooms each room may import from the project, and
`FORBIDDEN` which outside packages it must not import: the sample and evaluate jobs, for
instance, never see Lightning or the training room, so that sampling a checkpoint needs
neither.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import diffusion

PACKAGE = pathlib.Path(diffusion.__file__).parent

ALLOWED = {
    "utils": {"utils"},
    "process": {"process"},
    "nets": {"nets", "utils"},
    "sampling": {"sampling", "process", "utils"},
    "data": {"data", "utils"},
    "checkpoint": {"process", "nets", "utils"},
    "convert": {"checkpoint", "nets", "utils"},
    "evaluation": {"evaluation", "process", "data", "utils"},
    "training": {"training", "process", "nets", "sampling", "data", "checkpoint", "plot", "utils"},
    "jobs": {"jobs", "sampling", "evaluation", "checkpoint", "data", "process", "utils"},
    "cli": {"cli", "training", "jobs"},  # the entry points' functions: compose, then one call
    "plot": {"utils"},  # python -m diffusion.plot: a run's CSV log as a PNG (a report, no model)
    "__init__": {"utils", "_torchvision_compat", "process", "nets"},
    "_torchvision_compat": set(),
}
LIGHTNING = {"lightning", "pytorch_lightning"}
CONFIG = {"hydra", "omegaconf"}
FORBIDDEN = {
    "utils": LIGHTNING | CONFIG,
    "process": LIGHTNING | CONFIG,
    "nets": LIGHTNING | CONFIG,
    "sampling": LIGHTNING | CONFIG,
    "data": LIGHTNING | CONFIG,  # but data/module.py, the DataModule: see LIGHTNING_ALLOWED
    "checkpoint": LIGHTNING,
    "convert": LIGHTNING | CONFIG,
    "evaluation": LIGHTNING | CONFIG,
    "jobs": LIGHTNING,
    "cli": LIGHTNING,
    "plot": LIGHTNING | CONFIG,  # reads a CSV: plotting an old run needs neither
    "training": set(),
    "__init__": LIGHTNING | CONFIG,
    "_torchvision_compat": LIGHTNING | CONFIG,
}
LIGHTNING_ALLOWED = {"data/module.py"}


def room_of(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else path.stem


def imported_modules(path: pathlib.Path) -> list[str]:
    """Absolute names of every module ``path`` imports, at any depth of the file."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            if node.module == "diffusion":  # `from diffusion import process`
                names += [f"diffusion.{alias.name}" for alias in node.names]
    return names


def lazy_exports(path: pathlib.Path) -> list[str]:
    """The modules named in a package's ``_EXPORTS`` table (imported on first use)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return [value.value for value in node.value.values]
    return []


def target_room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_room_with_rules():
    rooms = {room_of(path) for path in SOURCES}
    assert rooms <= set(ALLOWED), sorted(rooms - set(ALLOWED))
    assert {"process", "nets", "sampling", "data", "checkpoint", "training", "evaluation", "jobs"} <= rooms


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_rooms(path):
    room = room_of(path)
    project = [m for m in imported_modules(path) + lazy_exports(path) if m.split(".")[0] == "diffusion"]
    upward = sorted({m for m in project if target_room(m) not in ALLOWED[room] | {room}})
    assert upward == [], f"{room} may import only {sorted(ALLOWED[room])}"
    forbidden = FORBIDDEN[room] - (LIGHTNING if str(path.relative_to(PACKAGE)) in LIGHTNING_ALLOWED else set())
    outside = sorted({m for m in imported_modules(path) if m.split(".")[0] in forbidden})
    assert outside == []


def test_the_rule_table_catches_an_upward_import(tmp_path):
    """The checker itself: a jobs module importing training, or a process module importing
    Lightning, is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("import lightning as L\nfrom diffusion.training.module import DiffusionModule\n")
    assert imported_modules(bad) == ["lightning", "diffusion.training.module"]
    assert target_room("diffusion.training.module") not in ALLOWED["jobs"]
    assert "lightning" in FORBIDDEN["process"]


def test_the_jobs_and_the_data_load_without_lightning_or_training():
    code = (
        "import sys, diffusion.jobs.sample, diffusion.jobs.evaluate, diffusion.data.image_data,"
        " diffusion.cli.sample, diffusion.cli.evaluate,"
        " diffusion.checkpoint, diffusion.convert, diffusion.evaluation.fid, diffusion.evaluation.bpd;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')"
        " or m.startswith('diffusion.training'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
