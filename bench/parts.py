"""Home-made parts against the libraries that do the same (issue 25, item 4).

    .venv/bin/python -m bench.parts [SECONDS]

In one process, each part and its library counterpart do one request's worth of work, taking turns, best
of 7 rounds of about SECONDS (default 0.3) each; the ratio is the library's time over the home-made
part's in the same run. The work is what a light `b64_json` request does with the part:

- metrics: the response counted, then the generation's record observed (one attempt, a cost), as
  `qubax.metrics.Metrics` does, against prometheus_client's `Counter` and `Histogram` (`labels(...)`
  per update, as its documentation shows; and with each series' child looked up once, its best case);
- key cache: a hit in `api_keys.KeyCache.fetch` against one in async-lru's `alru_cache(ttl=...)` (left out
  when async-lru is not installed);
- host check (only with `QUBAX_ALLOWED_HOSTS`): `app.AllowedHosts` (Starlette's `TrustedHostMiddleware`
  deciding) against the `fnmatch` check it replaced.

For a request's whole cost, `bench.instructions` (see bench/README.md).
"""

import asyncio
import fnmatch
import functools
import importlib
import sys
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from qubax.app import AllowedHosts
from qubax.records import api_keys
from qubax.records.ledger import AttemptRecord, GenerationRecord
from qubax.server.metrics import DURATION_BUCKETS, Metrics

LOOP = asyncio.new_event_loop()
RECORD = GenerationRecord(
    "gen_1", "key_1", "dall-e-3", 1, "1024x1024", "openai", 1, 40_000, 12,
    attempts=[AttemptRecord("openai", "dall-e-3", 1, 1, 11)],
)  # fmt: skip


def home_metrics() -> Callable[[], None]:
    metrics = Metrics()

    def one() -> None:
        metrics.observe(RECORD)
        metrics.count_response("POST", "/v1/images/generations", 200)

    return one


def library_metrics(children_once: bool) -> Callable[[], None]:
    """The same updates through prometheus_client's own metric types, in a registry of their own."""
    registry = CollectorRegistry()
    http = Counter("qubax_http_requests", "HTTP responses.", ("method", "path", "status"), registry=registry)
    generations = Counter("qubax_generations", "Generations.", ("model", "route", "outcome"), registry=registry)
    buckets = DURATION_BUCKETS
    duration = Histogram("qubax_generation_duration", "Time.", ("model", "route"), buckets=buckets, registry=registry)
    images = Counter("qubax_images", "Images delivered.", ("model", "route"), registry=registry)
    cost = Counter("qubax_cost_usd", "Cost.", ("model",), registry=registry)
    attempts = Counter("qubax_upstream_attempts", "Tries.", ("upstream", "outcome"), registry=registry)
    upstream = Histogram("qubax_upstream_duration", "Time.", ("upstream",), buckets=buckets, registry=registry)

    def one() -> None:
        record, model, route = RECORD, RECORD.model, RECORD.upstream
        generations.labels(model, route, record.outcome).inc()
        duration.labels(model, route).observe(record.latency_ms / 1000)
        images.labels(model, route).inc(record.images)
        cost.labels(model).inc(record.cost_micros / 1_000_000)
        for attempt in record.attempts:
            attempts.labels(attempt.upstream, attempt.outcome).inc()
            upstream.labels(attempt.upstream).observe(attempt.latency_ms / 1000)
        http.labels("POST", "/v1/images/generations", "200").inc()

    if not children_once:
        return one
    series = (
        generations.labels("dall-e-3", "openai", "ok"), images.labels("dall-e-3", "openai"),
        cost.labels("dall-e-3"), attempts.labels("openai", "ok"), http.labels("POST", "/v1/images/generations", "200"),
    )  # fmt: skip
    timed = (duration.labels("dall-e-3", "openai"), upstream.labels("openai"))

    def cached() -> None:
        for counter in series:
            counter.inc()
        for histogram in timed:
            histogram.observe(0.012)

    return cached


def key_caches() -> dict[str, Callable[[], Any]]:
    home: api_keys.KeyCache[str] = api_keys.KeyCache(ttl=1e9)

    async def load() -> str:
        return "key"

    found: dict[str, Callable[[], Any]] = {"api_keys.KeyCache": lambda: home.fetch("digest", load)}
    try:
        async_lru = importlib.import_module("async_lru")
    except ImportError:
        return found

    async def find(digest: str) -> str:
        return "key"

    lookup = async_lru.alru_cache(maxsize=10_000, ttl=1e9)(find)
    found["async_lru.alru_cache"] = functools.partial(lookup, "digest")
    return found


class FnmatchHosts:
    """The check `AllowedHosts` was before it handed the matching to Starlette."""

    def __init__(self, app: Any, patterns: list[str]) -> None:
        self.app, self.patterns = app, patterns

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        host = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"host"), "")
        parts = urllib.parse.urlsplit(f"//{host}")
        try:
            parts.port  # noqa: B018 (read for its check: a port that is no number raises)
        except ValueError:
            return
        if any(fnmatch.fnmatchcase(parts.hostname or "", pattern) for pattern in self.patterns):
            await self.app(scope, receive, send)


def host_checks() -> dict[str, Callable[[], Any]]:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    scope = {"type": "http", "headers": [(b"host", b"eu.qubax.test:8443")], "path": "/v1/images/generations"}
    patterns = ["api.example.com", "*.qubax.test"]
    checks: dict[str, Any] = {
        "fnmatch (before)": FnmatchHosts(app, patterns),
        "AllowedHosts (Starlette)": AllowedHosts(app, patterns),
    }
    return {name: functools.partial(check, scope, None, None) for name, check in checks.items()}


def best_of(parts: dict[str, Callable[[], Any]], seconds: float, rounds: int = 7) -> dict[str, float]:
    """Seconds per call of each part, its best round's (the least disturbed by the rest of the machine);
    the parts take turns within each round, so a slow minute falls on all of them."""
    loops = {name: max(1, int(seconds / max(timed(work, 10) / 10, 1e-8))) for name, work in parts.items()}
    best = dict.fromkeys(parts, float("inf"))
    for _ in range(rounds):
        for name, work in parts.items():
            best[name] = min(best[name], timed(work, loops[name]) / loops[name])
    return best


def timed(work: Callable[[], Any], loops: int) -> float:
    if not asyncio.iscoroutine(probe := work()):
        started = time.perf_counter()
        for _ in range(loops):
            work()
        return time.perf_counter() - started
    probe.close()

    async def awaited() -> float:
        started = time.perf_counter()
        for _ in range(loops):
            await work()
        return time.perf_counter() - started

    return LOOP.run_until_complete(awaited())  # one loop throughout: async-lru's cache is bound to one


def report(title: str, parts: dict[str, Callable[[], Any]], seconds: float) -> None:
    print(f"\n{title}")
    times = best_of(parts, seconds)
    base = next(iter(times.values()))
    for name, each in times.items():
        print(f"  {name:<44} {each * 1e6:8.2f} us  {each / base:5.2f}x")


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 0.3
    metrics = {
        "qubax.metrics (plain dicts, shaped at scrape)": home_metrics(),
        "prometheus_client, labels() per update": library_metrics(children_once=False),
        "prometheus_client, children looked up once": library_metrics(children_once=True),
    }
    report("metrics: one light request's updates", metrics, seconds)
    report("key cache: one hit (awaited in a fresh coroutine each time)", key_caches(), seconds)
    report("host check: one allowed request", host_checks(), seconds)


if __name__ == "__main__":
    main()
