"""Helper processes: frames answered in order, refusals said, a helper that dies fails only what it
had not answered and comes back, and one that is signalled to stop keeps going until its input ends.
Driven through the real image-file helper, `python -m qubax.records.file_writer`."""

import asyncio
import io
import os
from pathlib import Path

import pytest

from qubax.records import file_writer
from qubax.records.writers import WriteFailed, WriterProcess, serve

pytestmark = pytest.mark.anyio


async def write(helper: WriterProcess, path: Path, data: bytes) -> None:
    await helper.call(file_writer.frame(str(path), data))


async def test_overlapping_calls_are_all_answered(tmp_path: Path) -> None:
    helper = WriterProcess("qubax.records.file_writer")
    await asyncio.gather(*(write(helper, tmp_path / f"{i}.png", b"x" * i) for i in range(50)))
    assert all((tmp_path / f"{i}.png").read_bytes() == b"x" * i for i in range(50))
    await helper.close()


async def test_a_refused_frame_says_why_and_the_next_one_works(tmp_path: Path) -> None:
    helper = WriterProcess("qubax.records.file_writer")
    with pytest.raises(WriteFailed, match="No such file or directory"):
        await write(helper, tmp_path / "missing" / "a.png", b"png")
    await write(helper, tmp_path / "b.png", b"png")
    assert (tmp_path / "b.png").read_bytes() == b"png"
    await helper.close()


async def test_a_helper_that_dies_fails_what_it_had_not_answered_and_comes_back(tmp_path: Path) -> None:
    helper = WriterProcess("qubax.records.file_writer")
    await write(helper, tmp_path / "first.png", b"png")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it for writing blocks until a reader comes: the frame stays in flight
    stuck = asyncio.create_task(write(helper, fifo, b"png"))
    await asyncio.sleep(0.2)
    first = helper.process
    assert first is not None and not stuck.done()
    first.kill()
    with pytest.raises(WriteFailed, match="stopped"):
        await stuck
    await write(helper, tmp_path / "after.png", b"png")  # a new helper
    assert helper.process is not None and helper.process.pid != first.pid
    await helper.close()


async def test_a_helper_outlives_sigterm_and_ends_with_its_input(tmp_path: Path) -> None:
    helper = WriterProcess("qubax.records.file_writer")
    await write(helper, tmp_path / "a.png", b"png")
    process = helper.process
    assert process is not None
    process.terminate()  # as a service manager stopping every process of the service would
    await write(helper, tmp_path / "b.png", b"png")  # the server's last requests still get their files
    assert helper.process is process
    await helper.close()
    assert process.returncode == 0


def test_serve_answers_each_frame_in_order() -> None:
    def handle(payload: bytes) -> None:
        if payload == b"bad":
            raise OSError("refused\nwith two lines")

    frames = b"".join(len(p).to_bytes(4, "big") + p for p in (b"good", b"bad", b"good"))
    answers = io.BytesIO()
    serve(handle, io.BytesIO(frames), answers)
    assert answers.getvalue() == b"ok\nerror: refused with two lines\nok\n"


async def test_a_helper_that_could_not_start_is_started_by_the_next_call(tmp_path: Path) -> None:
    helper = WriterProcess("qubax.records.file_writer")
    command, helper.command = helper.command, (str(tmp_path / "no-such-python"),)
    with pytest.raises(FileNotFoundError):
        await write(helper, tmp_path / "a.png", b"png")
    helper.command = command
    await write(helper, tmp_path / "a.png", b"png")
    assert (tmp_path / "a.png").read_bytes() == b"png"
    await helper.close()
