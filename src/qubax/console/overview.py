"""The overview page: today and the last 30 days at a glance, images and spend per day and model, how
fast each route answers, the state of every route now, and the models' shutdown dates, with a warning for
those that shut down within 30 days and for routes whose upstream no longer serves their model."""

import statistics
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fastapi import Request, Response
from sqlalchemy import func, select

from qubax.console.charts import stacked_bars
from qubax.console.sessions import PageSession
from qubax.console.web import page, router, usd
from qubax.errors import MODEL_NOT_SERVED
from qubax.providers.registry import PROVIDERS
from qubax.records import queries, tables
from qubax.routing import lifecycle
from qubax.server.services import Services, ServicesDep

DAYS = 30
LATENCY_SAMPLES = 20_000  # the newest generations a day's percentiles are read from


@dataclass
class Totals:
    requests: int = 0
    images: int = 0
    cost_micros: int = 0
    errors: int = 0

    def add(self, row: queries.UsageRow) -> None:
        self.requests += row.requests
        self.images += row.images
        self.cost_micros += row.cost_micros
        self.errors += row.errors

    @property
    def error_rate(self) -> str:
        return f"{self.errors / self.requests:.1%}" if self.requests else "none"


@dataclass
class RouteState:
    model: str
    provider: str
    upstream_model: str
    configured: bool
    missing: str  # the variable to set, when not configured
    breaker_open: bool
    errors: int  # failed tries in the last hour
    last_error: str


@router.get("")
async def overview(request: Request, console: PageSession, services: ServicesDep) -> Response:
    today = datetime.now(UTC).date()
    days = [today - timedelta(days=DAYS - 1 - i) for i in range(DAYS)]
    async with services.sessions() as session:
        rows = await queries.usage(session, ("day", "model"), days[0], today)
    day_totals, month_totals = Totals(), Totals()
    images: dict[str, list[float]] = {}
    spend: dict[str, list[float]] = {}
    for row in rows:
        assert row.day is not None and row.model is not None
        month_totals.add(row)
        if row.day == today:
            day_totals.add(row)
        index = days.index(row.day)
        images.setdefault(row.model, [0.0] * DAYS)[index] += row.images
        spend.setdefault(row.model, [0.0] * DAYS)[index] += queries.to_usd(row.cost_micros)
    return page(
        request,
        "overview.html",
        console,
        title="Overview",
        today=day_totals,
        month=month_totals,
        images_chart=stacked_bars("Images per day, by model", days, images, lambda v: f"{v:,.0f}"),
        spend_chart=stacked_bars("Spend per day, by model", days, spend, lambda v: usd(round(v * 1_000_000))),
        latencies=await latencies(services),
        routes=await route_states(services),
        shutdowns=lifecycle.shutdowns(services.catalog.models, services.published),
        this_day=today,
        warn_days=lifecycle.WARN_DAYS,
        not_found=await not_found_routes(services),
    )


async def latencies(services: Services) -> list[tuple[str, int, int, int, int]]:
    """Per route, over the last day's successful generations: how many, and p50, p95, p99 in ms."""
    since = tables.now() - timedelta(days=1)
    query = (
        select(tables.Generation.upstream, tables.Generation.latency_ms)
        .where(tables.Generation.created_at >= since, tables.Generation.outcome == "ok")
        .order_by(tables.Generation.created_at.desc())
        .limit(LATENCY_SAMPLES)
    )
    by_route: dict[str, list[int]] = {}
    async with services.sessions() as session:
        for route, latency in await session.execute(query):
            by_route.setdefault(route, []).append(latency)
    found = []
    for route, values in sorted(by_route.items()):
        cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
        found.append((route, len(values), round(cuts[49]), round(cuts[94]), round(cuts[98])))
    return found


async def not_found_routes(services: Services) -> list[tuple[str, str, int]]:
    """The routes whose upstream answered, in the last day, that it does not serve their model: (provider,
    upstream model, how many times). A lasting answer: the model is likely shut down there."""
    query = (
        select(tables.Attempt.upstream, tables.Attempt.upstream_model, func.count())
        .where(tables.Attempt.created_at >= tables.now() - timedelta(days=1))
        .where(tables.Attempt.outcome == MODEL_NOT_SERVED)
        .group_by(tables.Attempt.upstream, tables.Attempt.upstream_model)
        .order_by(tables.Attempt.upstream, tables.Attempt.upstream_model)
    )
    async with services.sessions() as session:
        return [(upstream, model, count) for upstream, model, count in await session.execute(query)]


async def route_states(services: Services) -> list[RouteState]:
    """Every route of every model: configured or what to set, its breaker, its failures this last hour."""
    since = tables.now() - timedelta(hours=1)
    query = (
        select(tables.Attempt.upstream, tables.Attempt.upstream_model, tables.Attempt.error)
        .where(tables.Attempt.created_at >= since, tables.Attempt.outcome != "ok")
        .order_by(tables.Attempt.id)
    )
    failures: dict[tuple[str, str], list[str]] = {}
    async with services.sessions() as session:
        for upstream, upstream_model, error in await session.execute(query):
            failures.setdefault((upstream, upstream_model), []).append(error or "")
    states = []
    for model in services.catalog.models:
        for route in model.routes:
            failed = failures.get((route.provider, route.upstream_model), [])
            states.append(
                RouteState(
                    model=model.id,
                    provider=route.provider,
                    upstream_model=route.upstream_model,
                    configured=route.provider in services.providers,
                    missing=PROVIDERS[route.provider].credential,
                    breaker_open=services.breakers.is_open(f"{route.provider}:{route.upstream_model}"),
                    errors=len(failed),
                    last_error=failed[-1] if failed else "",
                )
            )
    return states
