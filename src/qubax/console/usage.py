"""The usage page (filtered by key, model and days; a table, a chart and a CSV download) and the jobs
page (recent jobs of every key, and webhook deliveries). The figures come from the queries the admin
API and the CLI use."""

import csv
import io
from datetime import UTC, date, datetime, timedelta

from fastapi import Request, Response
from markupsafe import Markup
from sqlalchemy import select

from qubax.api.admin import check_order, parse_day
from qubax.console.charts import stacked_bars
from qubax.console.sessions import PageSession
from qubax.console.web import page, router
from qubax.errors import InvalidRequest
from qubax.records import queries, tables
from qubax.server.services import Services, ServicesDep

RECENT = 50


@router.get("/usage")
async def usage_page(
    request: Request, console: PageSession, services: ServicesDep, key: str = "", model: str = "", since: str = "",
    until: str = "",
) -> Response:  # fmt: skip
    error = ""
    try:
        first, last = days(since, until)
    except InvalidRequest as exc:
        error, (first, last) = exc.message, days("", "")
    rows = await usage_rows(services, key, model, first, last)
    async with services.sessions() as session:
        keys = await queries.list_keys(session)
    chosen = {"key": key, "model": model, "since": first.isoformat(), "until": last.isoformat()}
    models = [model.id for model in services.catalog.models]
    shown = page(
        request, "usage.html", console, title="Usage", rows=rows, keys=keys, models=models, chosen=chosen,
        chart=chart(rows, first, last), query=request.url.query, error=error,
    )  # fmt: skip
    shown.status_code = 400 if error else 200
    return shown


def chart(rows: list[queries.UsageRow], first: date, last: date) -> Markup | None:
    """Images per day, by model: for ranges of up to about three months (a longer one has no chart)."""
    if (last - first).days >= 92:
        return None
    span = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    images: dict[str, list[float]] = {}
    for row in rows:
        assert row.day is not None and row.model is not None
        images.setdefault(row.model, [0.0] * len(span))[(row.day - first).days] += row.images
    return stacked_bars("Images per day, by model", span, images, lambda v: f"{v:,.0f}")


@router.get("/usage.csv")
async def usage_csv(
    console: PageSession, services: ServicesDep, key: str = "", model: str = "", since: str = "", until: str = ""
) -> Response:
    first, last = days(since, until)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["day", "key_id", "key_name", "model", "requests", "images", "cost_usd", "errors"])
    for row in await usage_rows(services, key, model, first, last):
        cost = f"{queries.to_usd(row.cost_micros):.6f}"
        writer.writerow([row.day, row.key_id, row.key_name, row.model, row.requests, row.images, cost, row.errors])
    name = f"qubax-usage-{first}-{last}.csv"
    headers = {"content-disposition": f'attachment; filename="{name}"'}
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8", headers=headers)


async def usage_rows(services: Services, key: str, model: str, first: date, last: date) -> list[queries.UsageRow]:
    async with services.sessions() as session:
        return await queries.usage(
            session, ("day", "key", "model"), first, last, key_id=key or None, model=model or None
        )


def days(since: str, until: str) -> tuple[date, date]:
    """The days asked for (checked as the admin API checks them); by default the last 30."""
    asked_first, asked_last = parse_day(since, "since"), parse_day(until, "until")
    last = asked_last or datetime.now(UTC).date()
    first = asked_first or last - timedelta(days=29)
    check_order(first, last)
    return first, last


@router.get("/jobs")
async def jobs_page(request: Request, console: PageSession, services: ServicesDep) -> Response:
    async with services.sessions() as session:
        jobs = list(await session.scalars(select(tables.ImageJob).order_by(tables.ImageJob.id.desc()).limit(RECENT)))
        query = select(tables.WebhookDelivery).order_by(tables.WebhookDelivery.id.desc()).limit(RECENT)
        deliveries = list(await session.scalars(query))
    return page(request, "jobs.html", console, title="Jobs and webhooks", jobs=jobs, deliveries=deliveries)
