"""Model lifecycles: the day an upstream stops serving a model, as the catalog says it (`shutdown_date`)
and as the upstream itself publishes it (OpenAI's `GET /v1/models` carries `shutdown_date`), read by
`background.lifecycle`. The console's overview and `/metrics` warn about what shuts down soon."""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from qubax.errors import InvalidRequest
from qubax.routing.models import CatalogModel

WARN_DAYS = 30  # a model that shuts down within this many days (or has shut down) is warned about
CATALOG = "catalog"  # the source of a date the catalog gives


@dataclass
class Published:
    """What upstreams publish about their models' shutdowns: by (provider, upstream model), as last read."""

    dates: dict[tuple[str, str], date] = field(default_factory=dict)
    read_at: dict[str, datetime] = field(default_factory=dict)  # by provider: when last read

    def update(self, provider: str, dates: Mapping[str, date]) -> None:
        """A provider's dates as read now, in place of those read before."""
        self.dates = {key: day for key, day in self.dates.items() if key[0] != provider}
        self.dates |= {(provider, model): day for model, day in dates.items()}
        self.read_at[provider] = datetime.now(UTC)

    def of(self, model: CatalogModel) -> tuple[date, str] | None:
        """The date an upstream publishes for the model, and which: the first of its own routes (not a
        stand-in's) that has one."""
        for route in model.routes:
            day = self.dates.get((route.provider, route.upstream_model))
            if day is not None and route.only_after is None:
                return day, route.provider
        return None


@dataclass(frozen=True)
class Shutdown:
    model: str
    day: date
    source: str  # CATALOG, or the provider that published it
    successor: str | None

    def days_left(self, today: date) -> int:
        return (self.day - today).days


def shut_down(name: str, successor: str) -> InvalidRequest:
    """The 400 for a model its upstreams have shut down: it names the model to ask for instead."""
    return InvalidRequest(
        f"The model `{name}` has been shut down upstream; use `{successor}`, its successor here.", param="model"
    )


def shutdown_date(model: CatalogModel, published: Published) -> date | None:
    """The date to show for a model: the catalog's (the operator may set one), else its upstream's."""
    found = published.of(model)
    return model.shutdown_date or (found[0] if found else None)


def shutdowns(models: Iterable[CatalogModel], published: Published) -> list[Shutdown]:
    """Every known shutdown date, the catalog's and the upstream's side by side, soonest first."""
    found = []
    for model in models:
        if model.shutdown_date is not None:
            found.append(Shutdown(model.id, model.shutdown_date, CATALOG, model.successor))
        if (upstream := published.of(model)) is not None:
            found.append(Shutdown(model.id, upstream[0], upstream[1], model.successor))
    return sorted(found, key=lambda shutdown: (shutdown.day, shutdown.model, shutdown.source))


def soon(found: Iterable[Shutdown], today: date | None = None) -> list[Shutdown]:
    """Those to warn about: shut down already, or within `WARN_DAYS` days."""
    last = (today or datetime.now(UTC).date()) + timedelta(days=WARN_DAYS)
    return [shutdown for shutdown in found if shutdown.day <= last]
