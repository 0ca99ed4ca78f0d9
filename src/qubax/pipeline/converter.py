"""Image conversions (`imaging.convert`) in worker processes of their own, at a lower priority.

Decoding, fitting and encoding an image holds a core for tens to hundreds of milliseconds. In worker
threads of the server's own process it competed with the event loop on equal terms: a few conversions
a second put plain requests' p99 up 3.4x (bench/README.md, "conversion load"). Worker processes with
a higher niceness let the operating system give the server's own process the CPU first, and a decoder
that crashes or is killed takes only its worker with it. As many workers as the server may use cores
(`QUBAX_CONVERT_PROCESSES`); the pool starts at the first conversion, each worker at the first one it
takes. A node whose upstreams answer as asked never converts, and so never pays for the pool: its
queues start multiprocessing's resource tracker, a process of ~12 MiB (bench/README.md, "idle memory").
"""

import asyncio
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import BaseContext

from qubax.errors import UpstreamError
from qubax.pipeline import imaging

NICENESS = 10  # added to the server's: its requests come first, conversions take the CPU left


def cores() -> int:
    """The cores this process may run on (its affinity, where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Converter:
    def __init__(self, processes: int | None = None) -> None:
        self.processes = processes or cores()
        self.pool: ProcessPoolExecutor | None = None

    def start(self) -> ProcessPoolExecutor:
        # Not a fork of the server, whose threads (the database's, asyncio's) may hold locks: a fork of a
        # fresh process that has `imaging` loaded (about 0.05 s a pool once it runs; 0.6-0.8 s for "spawn",
        # the fallback where the platform has no fork server), and that never runs the server's __main__.
        context: BaseContext = multiprocessing.get_context("spawn")
        if "forkserver" in multiprocessing.get_all_start_methods():
            server = multiprocessing.get_context("forkserver")
            server.set_forkserver_preload([imaging.__name__])
            context = server
        self.pool = ProcessPoolExecutor(self.processes, mp_context=context, initializer=os.nice, initargs=(NICENESS,))
        return self.pool

    async def convert(self, data: bytes, width: int, height: int, output_format: str) -> bytes:
        """`imaging.convert` in a worker; its `UpstreamError` for an unreadable image comes back as it is."""
        pool = self.pool or self.start()
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(pool, imaging.convert, data, width, height, output_format)
        except BrokenProcessPool as exc:
            # A worker died (killed for memory, or a crash in a decoder) and took the pool with it: the
            # conversions that were in it fail, the next ones get a new pool.
            if self.pool is pool:
                self.start()
                pool.shutdown(wait=False)
            raise UpstreamError("The image could not be converted: the process converting it stopped.") from exc

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
