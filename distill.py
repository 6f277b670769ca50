"""Distil a checkpoint into a student of few steps: python distill.py --help.

The entry point lives in the package, diffusion.cli.distill (also the console script
diffusion-distill), and finds its configs through it, so this works from any working directory.
"""

from diffusion.cli.distill import main

if __name__ == "__main__":
    main()
