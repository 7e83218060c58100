"""malloc.py: freed activation-sized blocks are reused instead of being faulted in again, by glibc
with keep_freed_memory (up to 32 MiB) and by the jemalloc a training worker preloads (any size)."""

import os
import subprocess
import sys

import pytest

from mtnlg_ray.malloc import JEMALLOC_CONF, worker_env

# 16 float32 tensors of `mib` MiB and a little more each time (as activations whose batch grows),
# each freed before the next; print the allocator and the minor page faults of each allocation.
PROBE = """
import resource, sys, torch
from mtnlg_ray.malloc import allocator, keep_freed_memory
mode, mib = sys.argv[1], int(sys.argv[2])
if mode == "keep":
    assert keep_freed_memory()
faults = []
for i in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(mib << 18 | i << 14)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(allocator(), *faults)
"""


def faults(mode: str, mib: int, env: dict[str, str] | None = None) -> tuple[str, list[int]]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(mib)], capture_output=True, text=True,
                         check=True, env={**os.environ, **(env or {})})
    name, *counts = out.stdout.split()
    return name, [int(n) for n in counts]


linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")


@linux
def test_freed_blocks_are_reused_without_page_faults():
    (_, default), (name, kept) = faults("default", 12), faults("keep", 12)
    assert name == "libc"
    # glibc maps each block afresh (above its mmap threshold) and unmaps it on free: one fault per
    # 4 KiB page, 3,072 for 12 MiB, every time.
    assert min(default[-4:]) > 3000, default
    # Kept: once the heap has settled (about 8 allocations), only the growth of each block faults.
    assert sum(kept[-4:]) < 1000, kept


@linux
def test_worker_jemalloc_reuses_blocks_above_glibcs_ceiling():
    """64-MiB blocks (the quickstart's logits): glibc maps them afresh even with keep_freed_memory
    (its mmap threshold stops at 32 MiB); the training worker's jemalloc reuses them."""
    env = worker_env({})
    assert env["MALLOC_CONF"] == JEMALLOC_CONF and os.path.isfile(env["LD_PRELOAD"])
    (_, glibc), (name, jemalloc) = faults("keep", 64), faults("default", 64, env)
    assert min(glibc[-4:]) > 16000, glibc  # 16,384 pages of 4 KiB
    assert name == "jemalloc" and sum(jemalloc[-4:]) < 1000, jemalloc


@linux
def test_worker_env_keeps_the_drivers_preload():
    env = worker_env({"LD_PRELOAD": "/opt/profiler.so"})
    assert env["LD_PRELOAD"].split()[1:] == ["/opt/profiler.so"]
