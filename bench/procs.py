"""Start servers in their own process groups, wait for their health checks, and always stop them."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

# No proxies, even if the environment names one: everything here is on loopback.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start(
    cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,  # its own process group, so stop() reaches its children too
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before {url} answered:\n{log_tail(log)}")
        try:
            with OPENER.open(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f}s:\n{log_tail(log)}")


def post(url: str, body: bytes, headers: dict[str, str], timeout: float = 60.0) -> tuple[int, bytes]:
    """One request, for the correctness check before loading: (status, body)."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with OPENER.open(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    return status, raw


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak resident set) of one process, in KiB."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def tree_rss_kib(pids: list[int]) -> int:
    """Resident memory of these processes added up, in KiB (a process gone meanwhile counts nothing)."""
    page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
    total = 0
    for one in pids:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{one}/statm").read_text().split()[1]) * page_kib
    return total


class PeakTreeRss:
    """The highest `tree_rss_kib` of a process and its descendants while the block runs, sampled every
    `interval` seconds (children that start meanwhile are found within a second)."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval, self.kib = pid, interval, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        pids, found_at = [self.pid], 0.0
        while not self._done.is_set():
            if time.monotonic() - found_at > 1.0:
                pids, found_at = [self.pid, *descendants(self.pid)], time.monotonic()
            self.kib = max(self.kib, tree_rss_kib(pids))
            self._done.wait(self.interval)

    def __enter__(self) -> "PeakTreeRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process and its live descendants have used so far, threads included
    (Qubax writes its SQLite usage ledger from a child process)."""
    ticks = 0
    for one in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):  # gone meanwhile
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            parents.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def log_summary(log: Path) -> dict[str, Any]:
    """Status codes in a uvicorn access log (warm-ups and checks included) and how many tracebacks it holds."""
    text = log.read_text(errors="replace")
    # uvicorn's access line (LiteLLM) ends the request with ` HTTP/1.1"`, Qubax's own with `"`.
    statuses = Counter(re.findall(r'"POST /v1/images/generations(?: HTTP/1\.1)?" (\d{3})', text))
    return {"statuses": dict(sorted(statuses.items())), "tracebacks": text.count("Traceback (most recent call last)")}
