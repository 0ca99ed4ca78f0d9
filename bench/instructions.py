"""Instructions per request, for telling small changes apart on a noisy machine.

Drives light `b64_json` requests straight into Qubax's ASGI app in this process (no HTTP server in
front, so uvicorn's share is left out), against the fake upstream running as its own process. Under
callgrind, only the measured requests are counted, and the count is exact to ~0.3% from run to run,
where wall-clock and CPU time on this VM drift by 10-30%:

    valgrind --tool=callgrind --instr-atstart=no .venv/bin/python -m bench.instructions [--requests 640]

(callgrind leaves an empty `callgrind.out.<pid>` in the current folder). `--payload heavy` has the
upstream answer with a 1.5 MB image instead; under callgrind give it `--connections 2 --requests 64`,
or 32 connections at a time outlast the upstream read timeout and end in a 502.

Compare two versions of the code by running it on each (e.g. `PYTHONPATH=/tmp/old/src`). Under
valgrind everything runs ~50x slower, so anything that depends on the clock behaves differently (the
disconnect watcher starts, key-cache entries expire: the cache's lifetime is lengthened here, and
the watcher's delay too). Without valgrind it prints CPU microseconds per request instead.
"""

import argparse
import asyncio
import logging.config
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench import targets

BODY = b'{"model": "dall-e-3", "prompt": "a cat", "size": "1024x1024", "response_format": "b64_json"}'


async def one(app: Any, headers: list[tuple[bytes, bytes]]) -> None:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/images/generations", "raw_path": b"/v1/images/generations", "query_string": b"",
        "root_path": "", "headers": headers, "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000),
        "state": {},
    }  # fmt: skip
    sent, statuses, never = False, [], asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await never.wait()  # the client stays
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    if statuses != [200]:
        raise RuntimeError(f"a request got {statuses}")


async def drive(requests: int, connections: int, key: str) -> None:
    from qubax.api import routes
    from qubax.app import create_app
    from qubax.server import allocator, logs
    from qubax.server.settings import Settings

    logging.config.dictConfig(logs.config("text"))  # as `qubax serve` sets logging up, but into a file
    allocator.keep_large_buffers()  # and its allocator
    log = (Path(os.environ["QUBAX_DATA_DIR"]) / "access.log").open("w")
    for handler in logging.getLogger("qubax").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(log)
    app = create_app(Settings())
    headers = [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
               (b"authorization", f"Bearer {key}".encode()), (b"content-length", str(len(BODY)).encode())]  # fmt: skip

    async def client(count: int) -> None:
        for _ in range(count):
            await one(app, headers)

    async with app.router.lifespan_context(app):
        await asyncio.gather(*(client(20) for _ in range(connections)))  # warm-up: helper processes, caches
        callgrind = "valgrind" in os.environ.get("LD_PRELOAD", "")
        if callgrind:  # the clock runs ~50x slow: keep a key lookup cached and fast work unwatched, as at speed
            app.state.services.keys.ttl = 1e9
            routes.WATCH_AFTER_SECONDS = 1e9
            control("--instr=on")
            control("--zero")
        each = requests // connections
        started = time.process_time()
        await asyncio.gather(*(client(each) for _ in range(connections)))
        cpu, done = time.process_time() - started, each * connections
        if callgrind:
            control("--dump=measured")
            control("--instr=off")
            print(f"{done} requests: {counted_instructions() // done:,} instructions each (callgrind)")
        else:
            print(f"{done} requests: {cpu / done * 1e6:.1f} us of CPU each")


def control(option: str) -> None:
    """Ask callgrind, which runs this process, to do something."""
    subprocess.run(["callgrind_control", option, str(os.getpid())], capture_output=True, check=True)


def counted_instructions() -> int:
    """The total of the dump `control("--dump=...")` wrote (callgrind's default file name, numbered)."""
    dump = Path(f"callgrind.out.{os.getpid()}.1")
    totals = [line for line in dump.read_text().splitlines() if line.startswith("totals:")]
    dump.unlink()
    return int(totals[0].split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=640)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--payload", choices=["light", "heavy"], default="light")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="qubax-instructions-"))
    try:
        with targets.upstream(args.payload, workdir) as up:
            env = targets.qubax_env(up.base, workdir / "data")
            os.environ.clear()
            os.environ.update(env)
            key = targets.create_key(env)
            uvloop.run(drive(args.requests, args.connections, key))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
