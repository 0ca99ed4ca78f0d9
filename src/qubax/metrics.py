"""Prometheus metrics: one registry per app, fed by every HTTP response and every generation's usage
record, served at `GET /metrics` (in `admin.py`) to a scraper that holds the admin token. Prompts are never labels."""

from typing import TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from qubax.ledger import GenerationRecord

M = TypeVar("M", Counter, Histogram)

# Image generation takes from a fraction of a second (test keys, fast models) to minutes (queues).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Path labels are route templates, never raw paths: image names and model ids would be unbounded.
PATHS = frozenset({"/v1/images/generations", "/v1/models", "/images", "/admin", "/healthz", "/metrics"})
PREFIXES = (("/v1/models/", "/v1/models"), ("/images/", "/images"), ("/admin/", "/admin"))
NO_ROUTE = "none"  # the route label of a generation that no route delivered


class Metrics:
    """The app's metrics. Label values are bounded: catalog model ids, provider names, our error codes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.http_requests = Counter(
            "qubax_http_requests", "HTTP responses.", ["method", "path", "status"], registry=registry
        )
        self.generations = Counter(
            "qubax_generations", "Image generation requests.", ["model", "route", "outcome"], registry=registry
        )
        self.generation_duration = Histogram(
            "qubax_generation_duration_seconds",
            "Time from admission to the images being ready, or the failure.",
            ["model", "route"],
            registry=registry,
            buckets=DURATION_BUCKETS,
        )
        self.images = Counter("qubax_images", "Images delivered.", ["model", "route"], registry=registry)
        self.cost = Counter("qubax_cost_usd", "What delivered images cost live keys.", ["model"], registry=registry)
        self.upstream_attempts = Counter(
            "qubax_upstream_attempts", "Tries of one route.", ["upstream", "outcome"], registry=registry
        )
        self.upstream_duration = Histogram(
            "qubax_upstream_duration_seconds",
            "Time one route's try took.",
            ["upstream"],
            registry=registry,
            buckets=DURATION_BUCKETS,
        )
        self.upstream_errors = Counter(
            "qubax_upstream_errors", "Tries of one route that did not end ok.", ["upstream", "code"], registry=registry
        )
        # `.labels()` costs ~1 µs a call and every request makes several: children are kept once made.
        self.children: dict[tuple[object, ...], Counter | Histogram] = {}
        self.responses: dict[tuple[str, str, int], Counter] = {}

    def count_response(self, method: str, path: str, status: int) -> None:
        key = (method if method in METHODS else "other", path_label(path), status)
        child = self.responses.get(key)
        if child is None:
            child = self.responses[key] = self.http_requests.labels(key[0], key[1], str(status))
        child.inc()

    def observe(self, generation: GenerationRecord) -> None:
        """Count one generation from the record the ledger writes, so the two always agree."""
        model, route = generation.model, generation.upstream or NO_ROUTE
        self.child(self.generations, model, route, generation.outcome).inc()
        self.child(self.generation_duration, model, route).observe(generation.latency_ms / 1000)
        if generation.images:
            self.child(self.images, model, route).inc(generation.images)
        if generation.cost_micros:
            self.child(self.cost, model).inc(generation.cost_micros / 1_000_000)
        for attempt in generation.attempts:
            self.child(self.upstream_attempts, attempt.upstream, attempt.outcome).inc()
            self.child(self.upstream_duration, attempt.upstream).observe(attempt.latency_ms / 1000)
            if attempt.outcome != "ok":
                self.child(self.upstream_errors, attempt.upstream, attempt.outcome).inc()

    def child(self, metric: M, *values: str) -> M:
        key = (metric, *values)
        found = self.children.get(key)
        if found is None:
            found = self.children[key] = metric.labels(*values)
        return cast(M, found)

    def exposition(self) -> bytes:
        """Everything, in Prometheus' text format."""
        return generate_latest(self.registry)


def path_label(path: str) -> str:
    if path in PATHS:
        return path
    for prefix, label in PREFIXES:
        if path.startswith(prefix):
            return label
    return "other"
