"""The memory allocator of a training worker, and glibc malloc settings for a serving engine.

PyTorch on CPU has no caching allocator of its own: every forward's activations come from the C
library's malloc, and where malloc hands out fresh pages, each 4 KiB costs a page fault.

glibc serves an allocation above its mmap threshold (128 KiB at start, rising with use to at most
32 MiB) with a fresh `mmap` that `free` unmaps again, and it trims the top of its heap once 128 KiB
there are free. Pinning the threshold at its maximum and turning trimming off
(`keep_freed_memory`) makes a process reuse its heap for blocks up to 32 MiB: a 16-prompt prefill
of the serving benchmark's model ((16 x 128, 1536) float32 MLP activations, 12.6 MB each) took
16,000-20,000 faults and spent 8% of its time in them without it (708 -> 648 ms). Blocks above
32 MiB are still mapped afresh every time.

A training worker preloads jemalloc instead (`worker_env`: the copy Ray ships in its wheel,
`ray/core/libjemalloc.so`, so nothing extra is installed; torch's own CPU launcher offers the same,
`torch.backends.xeon.run_cpu --enable-jemalloc`). Measured on a Ray Train worker
(docs/benchmarks.md):
- the quickstart's logits (16 x 256 x 4,096 float32, 64 MiB) and their gradients are above glibc's
  32 MiB ceiling: ~180,000 page faults a second with glibc, ~3 with jemalloc, and 1.25x the
  tokens/s (one 400-step run each);
- glibc with one arena for the process (MALLOC_ARENA_MAX=1, which stopped the training thread's
  own arena unmapping and mapping its heaps again every step) makes the two OpenMP threads queue
  on that arena's lock: MKL's sgemm inside flash attention's backward opens a nested OpenMP team
  per call, which allocates and frees its team (tens of thousands a second), and a profile of the
  threads' context switches puts ~3,000 sleeps a second each in `malloc`/`free`'s lock wait;
  jemalloc's per-thread caches and arenas take no shared lock there.
`dirty_decay_ms:-1` keeps freed pages for reuse (jemalloc otherwise returns them after 10 s, and
blocks above 8 MiB at once): the worker holds on to its peak memory, as `keep_freed_memory` does.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
NEVER_TRIM = 2**31 - 1  # bytes (mallopt takes an int): free heap top kept below this
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"  # never purge freed pages (module doc)
ONE_ARENA_ENV = {"MALLOC_ARENA_MAX": "1"}  # glibc, where there is no jemalloc: every thread on the main heap


def jemalloc_library() -> str | None:
    """Path of the jemalloc shared library in Ray's wheel (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    import ray

    path = Path(ray.__file__).parent / "core" / "libjemalloc.so"
    return str(path) if path.is_file() else None


def worker_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables that give a training worker's process its allocator (read when the
    process starts): jemalloc preloaded ahead of any LD_PRELOAD the driver has, else glibc with
    one arena."""
    library = jemalloc_library()
    if library is None:
        return dict(ONE_ARENA_ENV)
    preload = (environ if environ is not None else os.environ).get("LD_PRELOAD", "")
    return {"LD_PRELOAD": f"{library} {preload}".strip(), "MALLOC_CONF": JEMALLOC_CONF}


def allocator() -> str:
    """The allocator serving this process's malloc: "jemalloc" (preloaded) or "libc"."""
    try:
        ctypes.CDLL(None).mallctl  # only jemalloc defines it; a preloaded one is in the global scope
        return "jemalloc"
    except (OSError, AttributeError):
        return "libc"


def keep_freed_memory() -> bool:
    """glibc: apply the settings to this whole process; False where malloc is not glibc's (jemalloc
    preloaded, or another C library)."""
    if not sys.platform.startswith("linux") or allocator() == "jemalloc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
