"""The Hydra config root, installed with the package as ``diffusion.configs`` (setup.py).

Hydra reads a ``pkg://`` config folder only if it is a Python package, hence this file. The
YAML stays here, at the repository root; the entry points find it from any working directory.
"""
