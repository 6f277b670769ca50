"""Train a diffusion model (no arguments: the digits quickstart on the CPU): python train.py --help.

The entry point lives in the package, diffusion.cli.train (also the console script
diffusion-train), and finds its configs through it, so this works from any working directory.
"""

from diffusion.cli.train import main

if __name__ == "__main__":
    main()
