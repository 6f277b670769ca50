"""Where the package's files come from; everything else about it is in pyproject.toml.

The code is src/diffusion. The Hydra configs stay at the repository root, configs/ and conf/,
and install with the package as ``diffusion.configs`` and ``diffusion.conf``, so that the entry
points (diffusion.cli) find them through ``pkg://`` from any working directory, whether the
package is installed editable (`make setup`) or not (`pip install .`). pyproject.toml cannot
list packages found in src/ next to packages mapped from other folders, hence this file.
"""

from setuptools import find_namespace_packages, find_packages, setup

CONFIG_FOLDERS = {"diffusion.configs": "configs", "diffusion.conf": "conf"}


def config_packages(package: str, folder: str) -> list[str]:
    """``package`` and its config groups: setuptools wants every folder that holds package data
    listed as a package (a namespace package where it has no __init__.py)."""
    groups = find_namespace_packages(folder, exclude=["__pycache__", "*.__pycache__"])
    return [package, *(f"{package}.{group}" for group in groups)]


setup(
    package_dir={"": "src", **CONFIG_FOLDERS},
    packages=find_packages("src") + [p for item in CONFIG_FOLDERS.items() for p in config_packages(*item)],
    package_data={package: ["**/*.yaml"] for package in CONFIG_FOLDERS},
)
