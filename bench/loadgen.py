"""wrk, driven the same way for every target: one thread, fixed connections and duration, POST with JSON."""

import re
import subprocess
from pathlib import Path
from typing import Any

UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
WRK_TIMEOUT = "10s"  # a request slower than this counts as a timeout error


def lua_script(path: Path, body: str, headers: dict[str, str]) -> Path:
    def quote(text: str) -> str:
        return "[==[" + text + "]==]"  # a Lua long string: no escaping needed

    lines = ['wrk.method = "POST"', f"wrk.body = {quote(body)}"]
    lines += [f"wrk.headers[ {quote(name)} ] = {quote(value)}" for name, value in headers.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run(
    wrk: str, url: str, script: Path, connections: int, seconds: float, timeout: str = WRK_TIMEOUT
) -> dict[str, Any]:
    cmd = [wrk, "-t1", f"-c{connections}", f"-d{seconds:g}s", f"--timeout={timeout}", "--latency"]
    done = subprocess.run([*cmd, "-s", str(script), url], capture_output=True, text=True, check=True)
    if done.stderr.strip():  # a Lua error does not stop wrk: it would load the wrong request
        raise RuntimeError(f"wrk: {done.stderr.strip()}")
    return parse(done.stdout)


def to_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise ValueError(f"unreadable wrk duration {text!r}")
    return float(match[1]) * UNITS_MS[match[2]]


def parse(out: str) -> dict[str, Any]:
    def find(pattern: str) -> re.Match[str] | None:
        return re.search(pattern, out, re.MULTILINE)

    rps, requests = find(r"^Requests/sec:\s+([\d.]+)"), find(r"^\s*(\d+) requests in")
    p50, p99 = find(r"^\s+50(?:\.000)?%\s+(\S+)"), find(r"^\s+99(?:\.000)?%\s+(\S+)")
    transfer = find(r"^Transfer/sec:\s+([\d.]+)(B|KB|MB|GB)")
    sockets = find(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
    non2xx = find(r"Non-2xx or 3xx responses: (\d+)")
    if not (rps and requests):
        raise ValueError(f"unreadable wrk output:\n{out}")
    scale = {"B": 1e-6, "KB": 1e-3, "MB": 1.0, "GB": 1e3}
    socket_errors = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, sockets.groups()), strict=True)) if sockets else {}
    )
    errors = sum(socket_errors.values()) + (int(non2xx[1]) if non2xx else 0)
    return {
        "rps": float(rps[1]),
        "requests": int(requests[1]),
        "p50_ms": to_ms(p50[1]) if p50 else None,
        "p99_ms": to_ms(p99[1]) if p99 else None,
        "mb_per_s": float(transfer[1]) * scale[transfer[2]] if transfer else None,
        "non_2xx": int(non2xx[1]) if non2xx else 0,
        "socket_errors": socket_errors,
        "errors": errors,
    }
