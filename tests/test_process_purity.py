"""The process layer is pure math: torch + numpy, no Lightning, Hydra or OmegaConf (README, "Architecture")."""

import ast
import pathlib
import subprocess
import sys

import diffusion.process

PROCESS_DIR = pathlib.Path(diffusion.process.__file__).parent
FORBIDDEN = ("lightning", "pytorch_lightning", "hydra", "omegaconf")


def _imported_modules(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_no_process_module_imports_lightning_hydra_or_omegaconf():
    files = sorted(PROCESS_DIR.glob("*.py"))
    assert files, PROCESS_DIR
    offending = [
        (f.name, mod)
        for f in files
        for mod in _imported_modules(f)
        if mod.split(".")[0] in FORBIDDEN
    ]
    assert offending == []
    # and no dynamic import by string either
    for f in files:
        text = f.read_text()
        assert not any(f'"{name}' in text or f"'{name}" in text for name in FORBIDDEN), f.name


def test_importing_the_process_layer_loads_none_of_them():
    code = (
        "import sys, diffusion.process, diffusion.process.analytic;"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
