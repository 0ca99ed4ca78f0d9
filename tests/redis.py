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


class RedisServer:
    """A running redis-server in a throwaway folder; `stop` and `start` it again (same port, empty)."""

    def __init__(self, binary: str, root: Path) -> None:
        self.binary, self.root, self.port = binary, root, free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--databases", str(DATABASES), "--dir", str(self.root)]
        self.process = subprocess.Popen([self.binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.process)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """Start a server (no persistence: tests need none)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed: apt-get install -y redis-server (scripts/test does)")
    server = RedisServer(binary, Path(tempfile.mkdtemp(prefix="qubax-redis-")))
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


@contextlib.contextmanager
def running_redis() -> Iterator[str]:
    """Start a server and yield its URL."""
    with redis_server() as server:
        yield server.url


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
