"""Helper processes for blocking writes: the usage ledger's SQLite batches (`sqlite_writer.py`) and
small image files (`file_writer.py`), each a `WriterProcess`. Every other blocking file operation (big
images, a job's uploads, deletes, the sweep) runs in asyncio's own worker threads (`asyncio.to_thread`).

Why processes, not threads: a thread doing blocking writes shares the GIL with the event loop, and
every system call it makes hands the GIL over and back; under load each hand-over is a forced switch
that the event loop's thread pays for. Side by side with the driver's own async path (aiosqlite) and
a thread per file write, the light benchmark and url mode lose much of their throughput
(bench/README.md, "Helper processes or the simple version").

The protocol is the same for every helper: the parent sends frames (a 4-byte big-endian length, then
the payload); the helper handles them in order and answers each with one line, `ok` or
`error: <message>`. It ends when its input does: when the parent closes it, or dies. Standard
library only, so a helper starts quickly.
"""

import asyncio
import collections
import signal
import sys
from collections.abc import Callable
from typing import BinaryIO

LENGTH_BYTES = 4
STOP_SECONDS = 10  # for a helper to finish what it was sent and exit once its input has ended
READ_BYTES = 64 * 1024  # of answers, read at once


class WriteFailed(Exception):
    """The helper refused a frame (its message says why), or it is gone."""


class WriterProcess:
    """The parent's side: one helper process (`python -m <module> <args>`), started by the first call and
    again after it died. Calls may overlap; answers come back in the order the frames went out."""

    def __init__(self, module: str, *args: str) -> None:
        self.command = (sys.executable, "-m", module, *args)
        self.process: asyncio.subprocess.Process | None = None
        self.starting: asyncio.Future[asyncio.subprocess.Process] | None = None
        self.waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self.reader: asyncio.Task[None] | None = None

    async def call(self, payload: bytes) -> None:
        """Send one frame and wait for its answer; raises `WriteFailed`."""
        process = await self.started()
        assert process.stdin is not None
        answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append(answered)
        process.stdin.write(len(payload).to_bytes(LENGTH_BYTES, "big") + payload)
        await answered

    async def started(self) -> asyncio.subprocess.Process:
        if self.process is not None:  # running: `read_answers` forgets it when it ends
            return self.process
        if self.starting is None:  # concurrent first calls share one start
            self.starting = asyncio.ensure_future(self.start())
        starting = self.starting
        try:
            return await asyncio.shield(starting)
        except BaseException:
            # Only a start that failed is tried again by the next call: one that worked has a helper
            # running, and a second one would take its answers.
            failed = starting.done() and (starting.cancelled() or starting.exception() is not None)
            if failed and self.starting is starting:
                self.starting = None
            raise

    async def start(self) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            *self.command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            # Its own session, so Ctrl-C on the server does not reach it (nor do the signals it ignores):
            # it must outlive the server's last requests.
            start_new_session=True,
        )
        self.process = process
        self.reader = asyncio.create_task(self.read_answers(process))
        return process

    async def read_answers(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        # Whatever answers have arrived, read at once: a `readline()` each is measurably dearer (bench/README.md).
        rest = b""
        while chunk := await process.stdout.read(READ_BYTES):
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                self.settle(line)
        # End of output: the helper is gone. Whatever it had not answered failed with it.
        self.process, self.starting = None, None
        while self.waiting:
            answered = self.waiting.popleft()
            if not answered.done():
                answered.set_exception(WriteFailed(f"the helper process {self.command[2]} stopped"))

    def settle(self, line: bytes) -> None:
        answered = self.waiting.popleft()
        if answered.done():  # its caller gave up; the work was still done
            return
        if line == b"ok":
            answered.set_result(None)
        else:
            answered.set_exception(WriteFailed(line.decode(errors="replace").removeprefix("error: ").strip()))

    async def close(self) -> None:
        process = self.process
        if process is None or process.stdin is None:
            return
        process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), STOP_SECONDS)
        except TimeoutError:
            process.kill()
        if self.reader is not None:
            await self.reader


def run(handle: Callable[[bytes], None]) -> None:
    """A helper's main: serve stdin and stdout until the parent closes them."""
    # Stopping a service often signals every process it has (systemd, `docker stop`): the server then
    # finishes its requests, whose writes this process must still make. It stops when its input ends.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(handle, sys.stdin.buffer, sys.stdout.buffer)


def serve(handle: Callable[[bytes], None], frames: BinaryIO, answers: BinaryIO) -> None:
    """Handle every frame until the input ends, answering each; `handle` raises to refuse one."""
    while len(head := frames.read(LENGTH_BYTES)) == LENGTH_BYTES:
        payload = frames.read(int.from_bytes(head, "big"))
        try:
            handle(payload)
        except Exception as exc:  # refused: the caller hears why, and the next frame is handled
            answers.write(b"error: " + " ".join(str(exc).split()).encode() + b"\n")
        else:
            answers.write(b"ok\n")
        answers.flush()
