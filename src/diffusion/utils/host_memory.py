"""Keep freed host memory for reuse: glibc's allocator settings for CPU training.

By default glibc returns freed memory to the kernel once enough of it sits at the top of
the heap, and serves large blocks with mmap. A training step frees gigabytes of
activations and allocates them again in the next step, so every step then pays page
faults to get zeroed pages back. ``mallopt`` changes the settings in a running process.
On the CIFAR UNet at batch 32 on a 2-core CPU, the same harness run (``python
bench/performance.py --presets cifar_cosine_learned_sigma --batch 32 --steps 8``) spent 20.7
s in the kernel without them and 10.4 s with a 32 MiB mmap threshold (bench/results.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
# Blocks below this come from the heap (reused), larger ones from mmap. glibc before 2.26
# caps the option at 32 MiB; later versions take more.
MMAP_THRESHOLDS = (2**30, 32 * 2**20)


@functools.cache  # the settings are the process's: a job that calls it in several places sets them once
def retain_freed_memory() -> bool:
    """Serve blocks up to 1 GiB (or 32 MiB) from the heap and trim it only past 2 GiB of
    free memory; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not any(mallopt(M_MMAP_THRESHOLD, threshold) == 1 for threshold in MMAP_THRESHOLDS):
        return False
    return mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1 and mallopt(M_TOP_PAD, 256 * 2**20) == 1
