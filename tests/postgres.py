"""A real PostgreSQL server for the test suite (Debian's `postgresql` package), in a throwaway folder."""

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def binaries() -> Path | None:
    """The newest installed PostgreSQL's bin folder, or None."""
    found = [path for path in Path("/usr/lib/postgresql").glob("*/bin") if (path / "initdb").exists()]
    return max(found, key=lambda path: int(path.parent.name), default=None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Postgres:
    """A running server in a throwaway folder; `stop` and `start` it again to test a restart."""

    bin_dir: Path
    root: Path
    port: int
    as_user: list[str]

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}"

    def pg_ctl(self, *args: str) -> None:
        command = [*self.as_user, str(self.bin_dir / "pg_ctl"), "-D", str(self.root / "data"), *args]
        subprocess.run(command, check=True, capture_output=True)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        self.pg_ctl("-o", options, "-l", str(self.root / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """`fast` ends every session (their transactions roll back), as a restart by the operator does."""
        self.pg_ctl("-m", mode, "-w", "stop")


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    """Start a server (trust auth, fsync off: tests need no durability)."""
    bin_dir = binaries()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL is not installed: apt-get install -y postgresql")
    root = Path(tempfile.mkdtemp(prefix="qubax-pg-"))
    # PostgreSQL refuses to run as root; Debian's package brings a `postgres` user to run it as.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres")
    subprocess.run(
        [*as_user, str(bin_dir / "initdb"), "-D", str(root / "data"), "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
    )
    server = Postgres(bin_dir, root, free_port(), as_user)
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def running_postgres() -> Iterator[str]:
    """Start a server and yield its base URL."""
    with postgres_server() as server:
        yield server.url


async def create_database(base_url: str, name: str) -> str:
    import asyncpg

    connection = await asyncpg.connect(base_url.replace("postgresql+asyncpg", "postgresql") + "/postgres")
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return f"{base_url}/{name}"
