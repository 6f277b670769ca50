"""The experiment presets (``experiment/``), installed with the package as ``diffusion.conf``
(setup.py) and on ``hydra.searchpath`` of configs/train.yaml as ``pkg://diffusion.conf``.

Hydra reads a ``pkg://`` config folder only if it is a Python package, hence this file.
"""
