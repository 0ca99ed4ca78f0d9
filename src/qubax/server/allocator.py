"""How the server process allocates the big buffers an image passes through (the upstream's answer, the
base64 cut out of it, the decoded image, our answer): from the heap, whose freed pages are kept for the
next request instead of going back to the kernel.

Left to itself, glibc maps a block of a few megabytes on its own until one such block is freed, and
gives the top of its heap back to the kernel whenever twice its threshold lies free there. Either way
the next request's buffers are fresh pages, each faulted in as it is first written (512 for a 2 MB
buffer): a third of a 2 MB request's CPU went to parsing, decoding and writing buffers that never stayed
warm (bench/README.md, "Issue 27: the allocator"). The cost of keeping them: a node keeps the heap of its
busiest moment, up to TRIM_THRESHOLD of it free (glibc's default kept it as well whenever small live
objects sat between the freed blocks)."""

import ctypes
import os

MMAP_THRESHOLD = 64 * 1024 * 1024  # blocks below this come from the heap (an image is a few MB)
TRIM_THRESHOLD = 256 * 1024 * 1024  # free pages at the heap's top kept up to this much
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters; setting them stops their rising


def keep_large_buffers() -> bool:
    """Take blocks below MMAP_THRESHOLD from the heap and keep up to TRIM_THRESHOLD of it free, in this
    process and in those it starts (glibc reads MALLOC_*_ as a process starts: the workers). False where
    the C library has no mallopt (musl, macOS)."""
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(TRIM_THRESHOLD))
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
