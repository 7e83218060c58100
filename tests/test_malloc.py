"""keep_freed_memory: freed activation-sized blocks are reused instead of being faulted in again."""

import subprocess
import sys

import pytest

# 16 float32 tensors of 12 MiB and a little more each time (as activations whose batch grows), each
# freed before the next; print the minor page faults of each allocation.
PROBE = """
import resource, sys, torch
from mtnlg_ray.malloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = []
for i in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(3 << 20 | i << 14)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


def faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return [int(n) for n in out.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_freed_blocks_are_reused_without_page_faults():
    default, kept = faults("default"), faults("keep")
    # glibc maps each block afresh (above its mmap threshold) and unmaps it on free: one fault per
    # 4 KiB page, 3,072 for 12 MiB, every time.
    assert min(default[-4:]) > 3000, default
    # Kept: once the heap has settled (about 8 allocations), only the growth of each block faults.
    assert sum(kept[-4:]) < 1000, kept
