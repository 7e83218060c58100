"""glibc malloc settings for a serving engine or training worker: keep freed activation memory
instead of unmapping it.

glibc serves an allocation above its mmap threshold (128 KiB at start, rising with use to at most
32 MiB) with a fresh `mmap` that `free` unmaps again, and it trims the top of its heap once 128 KiB
there are free. PyTorch on CPU has no caching allocator of its own, so every forward's large
activations start as untouched pages, one page fault per 4 KiB: a 16-prompt prefill of the serving
benchmark's model ((16 x 128, 1536) float32 MLP activations, 12.6 MB each) took 16,000-20,000
faults and spent 8% of its time in them (708 -> 648 ms without them). Pinning the threshold at its
maximum and turning trimming off makes the process reuse its heap: no faults after the first
forward, at the price of holding on to its peak activation memory. (vLLM's CPU backend preloads
tcmalloc for the same reason; this needs nothing installed.) A training worker's step allocates
and frees the same activations every step: without the settings a Ray Train worker took 4x the
page faults of a bare loop and trained nanoGPT's CPU shape ~20% slower.

A Ray Train worker also trains in a thread of its own, which glibc gives an arena of its own: heaps
of at most 64 MiB that are unmapped as soon as they are entirely free, whatever the trim setting.
Steps whose activations spill into a second heap of that arena map and unmap it over and over
(several times a second, by strace): the worker still took ~18,000 page faults a second on
nanoGPT's CPU shape (a bare loop ~2,400). With one arena for the process (ONE_ARENA_ENV: glibc
reads it when the process starts, so it is an environment variable of the worker) the same run
took ~25 a second and stepped ~6% faster (seven alternating pairs of 600-step runs,
docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
NEVER_TRIM = 2**31 - 1  # bytes (mallopt takes an int): free heap top kept below this
ONE_ARENA_ENV = {"MALLOC_ARENA_MAX": "1"}  # every thread allocates from the main heap (docstring)


def keep_freed_memory() -> bool:
    """Apply the settings to this whole process; False where the C library has no glibc mallopt."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
