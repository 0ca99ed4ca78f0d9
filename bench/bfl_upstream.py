"""A fast fake Black Forest Labs upstream whose tasks take `--delay` seconds (bench/jobs.py).

    python -m bench.bfl_upstream --port 9002 [--delay 5]

BFL's protocol as `tests/fakes/bfl.py` speaks it (submit `POST /v1/<model>`, poll the `polling_url`, download
the `result.sample`), without its fault knobs and records: bare uvicorn and a raw ASGI app, a task a few
bytes in a dict, a light PNG (`bench.upstream`) built once per size. A task is Pending until `--delay`
seconds after its submission, then Ready; one submitted with a `webhook_url` is answered as BFL answers it
(`AsyncWebhookResponse`: no polling URL) and the task's result is POSTed there once Ready. `GET /stats`
counts what it was sent and the callbacks it made.
"""

import argparse
import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import aiohttp

from bench.upstream import make_png, respond, run_uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
JSON = [(b"content-type", b"application/json")]


class FakeBFL:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.tasks: dict[str, tuple[float, int, int]] = {}  # id: (when it is ready, width, height)
        self.pngs: dict[tuple[int, int], bytes] = {}
        self.counts: Counter[str] = Counter()
        self.callbacks: set[asyncio.Task[None]] = set()
        self.http: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read(receive)
        path, base = scope["path"], f"http://{dict(scope['headers'])[b'host'].decode()}"
        if scope["method"] == "POST" and path.startswith("/v1/"):
            status, answer, headers = 200, self.submit(json.loads(body), base), JSON
        elif path == "/v1/get_result":
            status, answer, headers = 200, self.result(scope["query_string"], base), JSON
        elif path.startswith("/delivery/"):
            status, answer, headers = self.delivery(path)
        elif path == "/stats":
            status, answer, headers = 200, json.dumps(self.counts).encode(), JSON
        elif path == "/health":
            status, answer, headers = 200, b"ok", []
        else:
            status, answer, headers = 404, b'{"detail":"Not Found"}', JSON
        await respond(send, status, answer, headers)

    def submit(self, body: dict[str, Any], base: str) -> bytes:
        self.counts["submits"] += 1
        task_id = uuid.uuid4().hex
        self.tasks[task_id] = (time.monotonic() + self.delay, body.get("width", 1024), body.get("height", 768))
        webhook = body.get("webhook_url")
        if isinstance(webhook, str):
            callback = asyncio.create_task(self.call_back(webhook, task_id, base))
            self.callbacks.add(callback)
            callback.add_done_callback(self.callbacks.discard)
            return json.dumps({"id": task_id, "status": "Pending", "webhook_url": webhook, "cost": 4}).encode()
        return json.dumps({"id": task_id, "polling_url": f"{base}/v1/get_result?id={task_id}", "cost": 4}).encode()

    async def call_back(self, url: str, task_id: str, base: str) -> None:
        await asyncio.sleep(self.delay)
        if self.http is None:
            self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        body = {"id": task_id, "status": "Ready", "result": {"sample": f"{base}/delivery/{task_id}.png"}}
        try:
            async with self.http.post(url, json=body) as response:
                self.counts[f"callbacks answered {response.status}"] += 1
        except aiohttp.ClientError as exc:
            self.counts[f"callbacks failed: {type(exc).__name__}"] += 1

    def result(self, query: bytes, base: str) -> bytes:
        self.counts["polls"] += 1
        task_id = parse_qs(query.decode()).get("id", [""])[0]
        task = self.tasks.get(task_id)
        if task is None:
            return json.dumps({"id": task_id, "status": "Task not found"}).encode()
        if time.monotonic() < task[0]:
            return json.dumps({"id": task_id, "status": "Pending", "result": None}).encode()
        sample = f"{base}/delivery/{task_id}.png"
        return json.dumps({"id": task_id, "status": "Ready", "result": {"sample": sample, "seed": 42}}).encode()

    def delivery(self, path: str) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        self.counts["downloads"] += 1
        task = self.tasks.get(path.rsplit("/", 1)[-1].split(".")[0])
        if task is None:
            return 404, b"<Error><Code>BlobNotFound</Code></Error>", [(b"content-type", b"application/xml")]
        size = task[1:]
        if size not in self.pngs:
            self.pngs[size] = make_png(*size, "light")
        return 200, self.pngs[size], [(b"content-type", b"image/png")]


async def read(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=5.0, help="seconds each task takes (default 5)")
    args = parser.parse_args()
    run_uvicorn(FakeBFL(args.delay), args.port)


if __name__ == "__main__":
    main()
