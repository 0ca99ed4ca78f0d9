"""The operator's catalog file (`QUBAX_CATALOG`, TOML): add models and aliases, reorder routes,
change prices and upstream model names, cap provider concurrency. Checked once, at start.

    [providers.bfl]
    concurrency = 12                       # active tasks per key

    [models."flux-1.1-pro"]
    price = 0.05
    aliases = ["flux-pro"]
    routes = [{ provider = "fal" }, { provider = "bfl" }]   # order = failover order

    [models."flux-kontext-pro"]            # max_images: the most input images a route takes in one edit
    routes = [{ provider = "replicate", max_images = 1 }, { provider = "bfl" }]

    [models."flux-dev"]                    # a new model: start from one we have, then change it
    like = "flux-1-schnell"
    price = 0.025
    routes = [{ provider = "fal", model = "fal-ai/flux/dev" }]

    [models."gpt-image-1.5"]               # a token-billed model's rates, USD per million tokens
    token_prices = { text_input = 5, image_input = 8, image_output = 32 }
"""

import dataclasses
import tomllib
from decimal import Decimal
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qubax.catalog import Catalog, CatalogModel, Fixed, Grid, Price, Route, TokenPrices
from qubax.models import MODELS, SHUT_DOWN


class CatalogError(ValueError):
    """The catalog file is unreadable or inconsistent; the message says where and why."""


class RouteEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: str
    model: str | None = None  # the upstream's name; defaults to the built-in one for that provider
    max_images: int | None = Field(default=None, ge=1, le=16)  # input images one edit may have; default: built-in


class GridEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: int = Field(ge=64, le=8192)
    max: int = Field(ge=64, le=8192)
    step: int = Field(ge=1, le=1024)


class TokenPricesEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text_input: Decimal = Field(ge=0)
    image_input: Decimal = Field(ge=0)
    image_output: Decimal = Field(ge=0)


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    like: str | None = None
    owned_by: str | None = None
    price: Decimal | None = Field(default=None, ge=0)
    token_prices: TokenPricesEntry | None = None
    aliases: list[str] | None = None
    routes: list[RouteEntry] | None = None
    sizes: list[str] | GridEntry | None = None
    default_size: str | None = None
    max_n: int | None = Field(default=None, ge=1, le=10)


class ProviderEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    concurrency: int = Field(ge=1, le=10_000)


class CatalogFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: dict[str, ModelEntry] = {}
    providers: dict[str, ProviderEntry] = {}


def load_catalog(path: Path | None, providers: set[str], defaults: dict[str, int]) -> Catalog:
    """The built-in catalog with the operator's file applied; `providers` are the names we can route to."""
    if path is None:
        return Catalog(MODELS, dict(defaults), SHUT_DOWN)
    try:
        parsed = CatalogFile.model_validate(tomllib.loads(path.read_text()))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CatalogError(f"QUBAX_CATALOG {path}: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise CatalogError(f"QUBAX_CATALOG {path}: {where}: {first['msg']}") from exc
    try:
        return apply(parsed, providers, defaults)
    except CatalogError as exc:
        raise CatalogError(f"QUBAX_CATALOG {path}: {exc}") from exc


def apply(parsed: CatalogFile, providers: set[str], defaults: dict[str, int]) -> Catalog:
    for name in parsed.providers:
        known_provider(name, providers, "providers")
    models = {model.id: model for model in MODELS}
    for model_id, entry in parsed.models.items():
        models[model_id] = build_model(model_id, entry, models, providers)
    claimed: dict[str, str] = {}
    for model in models.values():
        for name in (model.id, *model.aliases):
            if claimed.setdefault(name, model.id) != model.id:
                raise CatalogError(f"the name {name!r} is used by both {claimed[name]!r} and {model.id!r}")
    concurrency = dict(defaults) | {name: entry.concurrency for name, entry in parsed.providers.items()}
    return Catalog(tuple(models.values()), concurrency, SHUT_DOWN)


def build_model(model_id: str, entry: ModelEntry, models: dict[str, CatalogModel], providers: set[str]) -> CatalogModel:
    base = models.get(entry.like or model_id)
    if base is None:
        if entry.like:
            raise CatalogError(f"models.{model_id}.like: no model named {entry.like!r}")
        raise CatalogError(f'models.{model_id}: a new model needs `like = "<existing model>"` to start from')
    changes: dict[str, object] = {"id": model_id}
    if entry.like:  # a new model starts with no aliases of its own
        changes["aliases"] = ()
    if entry.owned_by is not None:
        changes["owned_by"] = entry.owned_by
    if entry.price is not None:
        changes["prices"] = (Price(entry.price),)
    if entry.token_prices is not None:
        changes["token_prices"] = TokenPrices(**entry.token_prices.model_dump())
    if entry.aliases is not None:
        changes["aliases"] = tuple(entry.aliases)
    if entry.max_n is not None:
        changes["max_n"] = entry.max_n
    if entry.sizes is not None:
        changes["sizes"] = build_sizes(model_id, entry.sizes)
    if entry.routes is not None:
        changes["routes"] = tuple(
            build_route(model_id, i, route, base, providers) for i, route in enumerate(entry.routes)
        )
    if entry.default_size is not None:
        changes["default_size"] = entry.default_size
    model = dataclasses.replace(base, **changes)  # type: ignore[arg-type]
    width, _, height = model.default_size.partition("x")
    if not (width.isdigit() and height.isdigit() and model.sizes.allows(int(width), int(height))):
        raise CatalogError(f"models.{model_id}.default_size {model.default_size!r} is not one of its sizes")
    if not model.routes:
        raise CatalogError(f"models.{model_id}.routes: a model needs at least one route")
    return model


def build_sizes(model_id: str, sizes: list[str] | GridEntry) -> Grid | Fixed:
    if isinstance(sizes, GridEntry):
        if sizes.min > sizes.max:
            raise CatalogError(f"models.{model_id}.sizes: min is larger than max")
        return Grid(sizes.min, sizes.max, sizes.step)
    for size in sizes:
        width, _, height = size.partition("x")
        if not (width.isdigit() and height.isdigit()):
            raise CatalogError(f"models.{model_id}.sizes: {size!r} is not WIDTHxHEIGHT")
    return Fixed(tuple(sizes))


def build_route(model_id: str, index: int, entry: RouteEntry, base: CatalogModel, providers: set[str]) -> Route:
    known_provider(entry.provider, providers, f"models.{model_id}.routes.{index}.provider")
    if entry.model is not None:
        return Route(entry.provider, entry.model, max_images=entry.max_images)
    for route in base.routes:
        if route.provider == entry.provider:
            return Route(route.provider, route.upstream_model, max_images=entry.max_images or route.max_images)
    raise CatalogError(
        f"models.{model_id}.routes.{index}: {entry.provider} has no built-in name for this model; set `model`"
    )


def known_provider(name: str, providers: set[str], where: str) -> None:
    if name not in providers:
        raise CatalogError(f"{where}: unknown provider {name!r} (known: {', '.join(sorted(providers))})")
