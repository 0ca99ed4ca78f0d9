"""A real Redis server for the test suite (Debian's `redis-server` package), in a throwaway folder."""

import contextlib
import itertools
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres import free_port

DATABASES = 100_000
_numbers = itertools.count(1)


@contextlib.contextmanager
def running_redis() -> Iterator[str]:
    """Start a server (no persistence: tests need none) and yield its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed: apt-get install -y redis-server (scripts/test does)")
    root, port = Path(tempfile.mkdtemp(prefix="qubax-redis-")), free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--databases", str(DATABASES), "--dir", str(root)]
    server = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, server)
        yield f"redis://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(root, ignore_errors=True)


def wait_for_port(port: int, server: subprocess.Popen[bytes], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"redis-server exited with {server.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


def fresh_redis(base_url: str) -> str:
    """A database number no other test uses, so tests never see each other's counters."""
    return f"{base_url}/{next(_numbers) % DATABASES}"
