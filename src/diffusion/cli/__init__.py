"""The entry points: ``train.py`` / ``sample.py`` / ``evaluate.py`` at the repository root and the
console scripts ``diffusion-train`` / ``diffusion-sample`` / ``diffusion-evaluate`` call the
``main`` of these modules. Each composes its config and makes one call into the package.

The configs install with the package (``configs/`` as ``diffusion.configs``, ``conf/`` as
``diffusion.conf``; see setup.py), so Hydra finds them through ``pkg://`` from any working
directory, and Hydra's job name (its log file) is the module's name: train, sample, evaluate.
"""
