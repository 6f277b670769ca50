"""Edit images with a checkpoint (DDIM inversion, reconstruction, interpolation, SDEdit):
python edit.py --help.

The entry point lives in the package, diffusion.cli.edit (also the console script
diffusion-edit), and finds its configs through it, so this works from any working directory.
"""

from diffusion.cli.edit import main

if __name__ == "__main__":
    main()
