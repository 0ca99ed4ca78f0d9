"""Conversions in worker processes: what comes back, at what priority, and a worker that dies."""

import io
import os
import signal
from collections.abc import Iterator

import pytest
from PIL import Image

from qubax.errors import UpstreamError
from qubax.pipeline.converter import NICENESS, Converter


@pytest.fixture
def converter() -> Iterator[Converter]:
    converting = Converter(1)
    yield converting
    converting.close()


def jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(out, "JPEG")
    return out.getvalue()


@pytest.mark.anyio
async def test_an_image_is_converted_in_a_worker_process_at_a_lower_priority(converter: Converter) -> None:
    assert converter.pool is None  # nothing started before there is something to convert
    png = await converter.convert(jpeg(64, 48), 32, 32, "png")
    with Image.open(io.BytesIO(png)) as image:
        assert (image.format, image.size) == ("PNG", (32, 32))
    assert converter.pool is not None
    [worker] = converter.pool._processes.values()  # started by the first conversion
    assert worker.pid != os.getpid()
    assert os.getpriority(os.PRIO_PROCESS, worker.pid) == os.getpriority(os.PRIO_PROCESS, 0) + NICENESS


@pytest.mark.anyio
async def test_an_unreadable_image_is_the_upstreams_error_as_raised_in_the_worker(converter: Converter) -> None:
    with pytest.raises(UpstreamError, match="not a readable image") as caught:
        await converter.convert(b"\xff\xd8 not a jpeg", 32, 32, "png")
    assert caught.value.status_code == 502


@pytest.mark.anyio
async def test_a_worker_that_dies_fails_its_conversion_and_the_next_gets_a_new_pool(converter: Converter) -> None:
    await converter.convert(jpeg(64, 48), 32, 32, "png")
    broken = converter.pool
    assert broken is not None
    [worker] = broken._processes.values()
    os.kill(worker.pid, signal.SIGKILL)  # as the kernel's out-of-memory killer would
    with pytest.raises(UpstreamError, match="process converting it stopped"):
        await converter.convert(jpeg(64, 48), 32, 32, "png")
    assert converter.pool is not broken
    png = await converter.convert(jpeg(64, 48), 16, 16, "png")
    assert png.startswith(b"\x89PNG")
