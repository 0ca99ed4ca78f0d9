"""The server's big buffers go back to the kernel when freed (`server.allocator`), in a process of its own."""

import os
import platform
import subprocess
import sys

import pytest

# Two-megabyte blocks, each followed by a small object that stays (as a request's leave the heap
# between images), freed; then the resident set, in MiB, against what it was before.
SCRIPT = """
import os, sys
from qubax.server.allocator import return_large_buffers

def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

if sys.argv[1] == "on":
    assert return_large_buffers()
bytearray(4 * 2**20)  # made and freed: glibc's own threshold now rises past the blocks below
before = resident_mib()
blocks, kept = [], []
for _ in range(100):
    blocks.append(bytearray(2 * 2**20))
    kept.append(bytearray(4000))
del blocks
print(resident_mib() - before)
"""


def grown_mib(setting: str) -> float:
    env = {name: value for name, value in os.environ.items() if name != "MALLOC_MMAP_THRESHOLD_"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, setting], capture_output=True, text=True, check=True, env=env)
    return float(done.stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_image_sized_buffers_leave_the_resident_set() -> None:
    assert grown_mib("off") > 150  # held by glibc's heap, behind the small blocks between them
    assert grown_mib("on") < 20
