"""Prometheus metrics: one registry per app, fed by every HTTP response and every generation's usage
record, served at `GET /metrics` (in `admin.py`) to a scraper that holds the admin token. Prompts are never labels."""

import bisect
import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from qubax.errors import MODEL_NOT_SERVED, DatabaseUnavailable
from qubax.records import queries
from qubax.records.ledger import GenerationRecord
from qubax.routing.lifecycle import WARN_DAYS, Shutdown, soon

logger = logging.getLogger("qubax")
# Image generation takes from a fraction of a second (test keys, fast models) to minutes (queues).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Path labels are route templates, never raw paths: image names and model ids would be unbounded.
PATHS = frozenset(
    {"/v1/images/generations", "/v1/images/edits", "/v1/images/jobs", "/v1/models", "/images", "/admin", "/healthz"}
    | {"/metrics"}
)
PREFIXES = (
    ("/v1/images/jobs/", "/v1/images/jobs"),
    ("/v1/models/", "/v1/models"),
    ("/images/", "/images"),
    ("/admin/", "/admin"),
    # Upstream callbacks, by status: 204 verified (and passed on), 401 refused.
    ("/v1/upstream-callbacks/", "/v1/upstream-callbacks"),
)
NO_ROUTE = "none"  # the route label of a generation that no route delivered


Labels = tuple[str, ...]


@dataclass
class Family:
    """One metric's series, counted in a plain dict; turned into Prometheus' shape only when scraped.
    prometheus_client's own counters take a lock and a `labels()` lookup on every update (here every
    update and every scrape runs on the event loop): ~8x ours, 3.5-6.7% more instructions a light request
    (bench/README.md, "Home-made parts and libraries")."""

    name: str
    help: str
    labels: Labels
    buckets: tuple[float, ...] = ()  # a histogram's upper bounds; none for a counter
    # A counter's cell is [total]; a histogram's is a count per bucket, then +Inf, then the sum.
    series: dict[Labels, list[float]] = field(default_factory=dict)

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        cell = self.series.get(labels)
        if cell is None:
            cell = self.series[labels] = [0.0]
        cell[0] += amount

    def observe(self, labels: Labels, value: float) -> None:
        cell = self.series.get(labels)
        if cell is None:
            cell = self.series[labels] = [0.0] * (len(self.buckets) + 2)
        cell[bisect.bisect_left(self.buckets, value)] += 1  # the first bound >= value: buckets are `le`
        cell[-1] += value

    def family(self) -> Metric:
        series = self.series.items()  # read on the event loop, like every update: nothing changes meanwhile
        if not self.buckets:
            counter = CounterMetricFamily(self.name, self.help, labels=self.labels)
            for labels, (total,) in series:
                counter.add_metric(labels, total)
            return counter
        histogram = HistogramMetricFamily(self.name, self.help, labels=self.labels)
        bounds = [*map(floatToGoString, self.buckets), "+Inf"]
        for labels, cell in series:
            counts = itertools.accumulate(cell[:-1])
            histogram.add_metric(labels, list(zip(bounds, counts, strict=True)), sum_value=cell[-1])
        return histogram


class Metrics(Collector):
    """The app's metrics. Label values are bounded: catalog model ids, provider names, our error codes."""

    def __init__(self) -> None:
        self.http_requests = Family("qubax_http_requests", "HTTP responses.", ("method", "path", "status"))
        self.generations = Family("qubax_generations", "Image generation requests.", ("model", "route", "outcome"))
        self.generation_duration = Family(
            "qubax_generation_duration_seconds",
            "Time from admission to the images being ready, or the failure.",
            ("model", "route"),
            DURATION_BUCKETS,
        )
        self.images = Family("qubax_images", "Images delivered.", ("model", "route"))
        self.cost = Family("qubax_cost_usd", "What delivered images cost live keys.", ("model",))
        self.upstream_attempts = Family("qubax_upstream_attempts", "Tries of one route.", ("upstream", "outcome"))
        self.upstream_duration = Family(
            "qubax_upstream_duration_seconds", "Time one route's try took.", ("upstream",), DURATION_BUCKETS
        )
        self.upstream_errors = Family(
            "qubax_upstream_errors", "Tries of one route that did not end ok.", ("upstream", "code")
        )
        # A lasting answer about a route's model, not a passing failure: its upstream no longer serves it.
        self.model_not_found = Family(
            "qubax_upstream_model_not_found",
            "Tries whose upstream answered that it does not serve the route's model.",
            ("upstream", "upstream_model"),
        )
        self.upstream_waits = Family(
            "qubax_upstream_waits",
            "Upstream calls that waited for capacity: a free connection, or a slot under a provider's cap.",
            ("upstream", "resource"),
        )
        self.upstream_wait_duration = Family(
            "qubax_upstream_wait_seconds", "How long those calls waited.", ("upstream", "resource"), DURATION_BUCKETS
        )
        # `qubax_jobs` is the gauge of jobs not yet ended (`read_jobs`); these are those this node ended.
        self.jobs = Family("qubax_jobs_ended", "Jobs ended by this node, by how they ended.", ("status",))
        self.job_states: dict[str, int] | None = None  # every node's jobs by status, as last read
        self.shutdowns: list[Shutdown] = []  # the models' known shutdown dates, as a scrape begins
        self.webhook_tries = Family(
            "qubax_webhook_tries",
            "Tries of a webhook delivery: delivered, retry (to be tried again) or failed.",
            ("outcome",),
        )
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def collect(self) -> Iterable[Metric]:
        for family in vars(self).values():
            if isinstance(family, Family):
                yield family.family()
        if self.job_states is not None:
            gauge = GaugeMetricFamily("qubax_jobs", "Jobs not yet ended, of every node, by status.", labels=("state",))
            for state, count in self.job_states.items():
                gauge.add_metric((state,), count)
            yield gauge
        yield from self.lifecycle()

    def lifecycle(self) -> Iterable[Metric]:
        """Each known shutdown date (the catalog's and the upstream's, by `source`), and a 1 for each
        model that shuts down within `WARN_DAYS` days or has shut down: what an alert watches."""
        dates = GaugeMetricFamily(
            "qubax_model_shutdown_timestamp_seconds",
            "When a model's upstream stops serving it (00:00 UTC that day), by who says so.",
            labels=("model", "source"),
        )
        warned = GaugeMetricFamily(
            "qubax_model_shutting_down",
            f"1 for a model that shuts down within {WARN_DAYS} days or has shut down upstream.",
            labels=("model", "date"),
        )
        for shutdown in self.shutdowns:
            midnight = datetime.combine(shutdown.day, time(), UTC)
            dates.add_metric((shutdown.model, shutdown.source), midnight.timestamp())
        for shutdown in soon(self.shutdowns):
            warned.add_metric((shutdown.model, shutdown.day.isoformat()), 1)
        return (dates, warned)

    async def read_jobs(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        """The `qubax_jobs` gauge's figures, read from the database as a scrape begins: queued jobs are
        no node's yet, so no node could count them as they change. A database that cannot answer leaves
        the gauge out of this scrape, rather than the whole scrape unanswered."""
        try:
            async with sessions() as session:
                self.job_states = await queries.count_jobs(session)
        except (OSError, SQLAlchemyError, DatabaseUnavailable) as exc:
            logger.warning("counting jobs for /metrics failed: %s", exc)
            self.job_states = None

    def count_response(self, method: str, path: str, status: int) -> None:
        self.http_requests.inc((method if method in METHODS else "other", path_label(path), str(status)))

    def observe(self, generation: GenerationRecord) -> None:
        """Count one generation from the record the ledger writes, so the two always agree."""
        model, route = generation.model, generation.upstream or NO_ROUTE
        self.generations.inc((model, route, generation.outcome))
        self.generation_duration.observe((model, route), generation.latency_ms / 1000)
        if generation.images:
            self.images.inc((model, route), generation.images)
        if generation.cost_micros:
            self.cost.inc((model,), queries.to_usd(generation.cost_micros))
        for attempt in generation.attempts:
            self.upstream_attempts.inc((attempt.upstream, attempt.outcome))
            self.upstream_duration.observe((attempt.upstream,), attempt.latency_ms / 1000)
            if attempt.outcome != "ok":
                self.upstream_errors.inc((attempt.upstream, attempt.outcome))
            if attempt.outcome == MODEL_NOT_SERVED:
                self.model_not_found.inc((attempt.upstream, attempt.upstream_model))

    def count_wait(self, upstream: str, resource: str, seconds: float) -> None:
        """One wait for upstream capacity (`providers.pool.Waited`); `resource` is "connection" or "slot"."""
        self.upstream_waits.inc((upstream, resource))
        self.upstream_wait_duration.observe((upstream, resource), seconds)

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
