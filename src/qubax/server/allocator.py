"""How the server process allocates its big buffers (an image, its base64 text, an answer): each mapped
on its own and handed back to the kernel when freed.

glibc carves a freed block of a few megabytes from the heap after the first one (its threshold for
mapping a block on its own rises to the largest block freed so far), and a heap with small live objects
between the holes cannot shrink: 200 requests with 2 MB images in flight left a node holding the
megabytes of its busiest moment (bench/README.md, "Issue 27 item 2")."""

import ctypes
import os

MMAP_THRESHOLD = 1024 * 1024  # blocks from this size on are mapped on their own; below, the heap
M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter; setting it also stops the threshold rising


def return_large_buffers() -> bool:
    """Map blocks of MMAP_THRESHOLD and more on their own, in this process and in those it starts (glibc
    reads MALLOC_MMAP_THRESHOLD_ as a process starts). False where the C library is not glibc."""
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no mallopt: musl, macOS
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
