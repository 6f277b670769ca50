"""sample.py imports only what sampling needs (issue 17: its start-up counts against its
images/s): Lightning, torchmetrics, scipy, matplotlib, scikit-learn and torchvision (with
torch._dynamo and sympy, which it loads) never load."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_sample_py_imports_no_lightning_metrics_or_plotting(tiny_ckpt, tmp_path):
    """A whole sample.py run (npz, shards and grid) in a fresh process: none of the packages
    that sample.py does not need is imported, at start or at any later stage."""
    code = (
        "import sys; from diffusion.cli.sample import main; sys.argv[0] = 'sample.py'; main(); "
        "heavy = ('lightning', 'torchmetrics', 'scipy', 'matplotlib', 'sklearn', 'torchvision', 'torch._dynamo', "
        "'sympy'); "
        "print('imported:', sorted(m for m in heavy if m in sys.modules))"
    )
    args = [f"ckpt={tiny_ckpt}", "sampler=ddim10", "num_samples=3", "batch_size=2", "progress=false",
            f"hydra.run.dir={tmp_path}"]
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "imported: []" in result.stdout, result.stdout
    assert sorted(p.name for p in tmp_path.glob("samples_3x8x8x1.*")) == ["samples_3x8x8x1.npz", "samples_3x8x8x1.png"]
