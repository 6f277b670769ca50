"""Evaluate a checkpoint: bits/dim, or FID / IS of samples: python evaluate.py --help.

The entry point lives in the package, diffusion.cli.evaluate (also the console script
diffusion-evaluate), and finds its configs through it, so this works from any working directory.
"""

from diffusion.cli.evaluate import main

if __name__ == "__main__":
    main()
