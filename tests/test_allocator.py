"""The server's big buffers stay in its heap for the next request (`server.allocator`), in a process of
its own (the settings are the process's)."""

import os
import platform
import subprocess
import sys

import pytest

from qubax.server import allocator

# A request's buffers for a 2 MB image (the upstream's answer, the base64 cut out, the decoded image,
# our answer), each written and then freed, fifty times over: the page faults it takes after the first.
SCRIPT = """
import resource, sys
from qubax.server.allocator import keep_large_buffers

if sys.argv[1] == "on":
    assert keep_large_buffers()

def one_request():
    buffers = [bytearray(2 * 2**20), bytearray(2 * 2**20), bytearray(3 * 2**19), bytearray(2 * 2**20)]
    for buffer in buffers:
        buffer[::4096] = b"x" * len(buffer[::4096])

one_request()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    one_request()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run(script: str, *args: str) -> str:
    """What `script` prints, run by a fresh interpreter with glibc's defaults (no MALLOC_ variables)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, check=True, env=env
    ).stdout


def page_faults(setting: str) -> int:
    return int(run(SCRIPT, setting))


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_an_images_buffers_are_reused_not_faulted_in_again() -> None:
    assert page_faults("off") > 50 * 1000  # glibc's default: the heap's top given back, every page faulted again
    assert page_faults("on") < 500


def test_the_processes_the_server_starts_get_the_same_settings() -> None:
    printed = run(
        "import os; from qubax.server import allocator; allocator.keep_large_buffers(); print(dict(os.environ))"
    )
    # glibc reads these as a process starts: the workers of `qubax serve --workers N`
    assert f"'MALLOC_MMAP_THRESHOLD_': '{allocator.MMAP_THRESHOLD}'" in printed
    assert f"'MALLOC_TRIM_THRESHOLD_': '{allocator.TRIM_THRESHOLD}'" in printed
