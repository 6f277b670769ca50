"""Sample from a checkpoint into an npz and a grid: python sample.py --help.

The entry point lives in the package, diffusion.cli.sample (also the console script
diffusion-sample), and finds its configs through it, so this works from any working directory.
"""

from diffusion.cli.sample import main

if __name__ == "__main__":
    main()
