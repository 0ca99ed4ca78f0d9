"""The catalog files (TOML): the built-in one shipped with the package (`builtin_catalog.toml`), then the
operator's (`QUBAX_CATALOG`) over it, both read here by the same rules. The operator's file adds models and
aliases, reorders routes, changes prices and upstream model names, caps provider concurrency. Checked
once, at start.

Where prices come from: every built-in price is in `builtin_catalog.toml`, beside a `# Price:` comment
naming the provider's pricing page and when it was read; the operator's file changes them. No price is
written in code.

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

    [models."flux-2-pro"]                  # billed by megapixel: the first, then each further one
    megapixel_price = { first = 0.03, further = 0.015 }

    [models."flux-1-schnell"]              # its lifecycle: the day its upstream stops serving it, and
    shutdown_date = 2027-03-01             # the model to ask for instead (named in a 400 once its
    successor = "flux-1.1-pro"             # upstreams answer that they no longer serve it)
"""

import dataclasses
import tomllib
from datetime import date
from decimal import Decimal
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qubax.errors import MODEL_NOT_SERVED
from qubax.routing.catalog import Catalog
from qubax.routing.catalog_prices import MegapixelPriceEntry, PriceEntry, TokenPricesEntry, price_changes
from qubax.routing.models import CatalogModel, Fixed, Free, Grid, Route

BUILTIN = resources.files("qubax.routing") / "builtin_catalog.toml"
# What a model made without `like` must say (the catalog's other fields have defaults).
REQUIRED = ("owned_by", "created", "sizes", "default_size", "max_n", "prices", "routes")
PRICE_KEYS = ("price", "prices", "token_prices", "megapixel_price")  # read by `catalog_prices`


class CatalogError(ValueError):
    """The catalog file is unreadable or inconsistent; the message says where and why."""


class RouteEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: str
    model: str | None = None  # the upstream's name; defaults to the built-in one for that provider
    max_images: int | None = Field(default=None, ge=1, le=16)  # input images one edit may have; default: built-in
    only_after: str | None = None  # taken only when the route before failed with this error code


class GridEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: int = Field(ge=64, le=8192)
    max: int = Field(ge=64, le=8192)
    step: int = Field(ge=1, le=1024)


class FreeEntry(BaseModel):
    """Any multiple of `step`, within bounds on the longer side, the aspect ratio and the pixels."""

    model_config = ConfigDict(extra="forbid")
    step: int = Field(ge=1, le=1024)
    max_side: int = Field(ge=64, le=16384)
    max_ratio: int = Field(ge=1, le=100)
    min_pixels: int = Field(ge=1)
    max_pixels: int = Field(ge=1)


class ModelEntry(BaseModel):
    """A model's keys. Those below `routes` are named as `CatalogModel`'s fields and copied as they are."""

    model_config = ConfigDict(extra="forbid")
    like: str | None = None
    price: Decimal | None = Field(default=None, ge=0)
    prices: list[PriceEntry] | None = Field(default=None, min_length=1)  # the first that matches applies
    token_prices: TokenPricesEntry | None = None
    megapixel_price: MegapixelPriceEntry | None = None
    sizes: list[str] | GridEntry | FreeEntry | None = None
    routes: list[RouteEntry] | None = None
    owned_by: str | None = None
    created: int | None = Field(default=None, ge=0)
    aliases: list[str] | None = None
    default_size: str | None = None
    max_n: int | None = Field(default=None, ge=1, le=10)
    qualities: list[str] | None = None
    default_quality: str | None = None
    styles: list[str] | None = None
    default_style: str | None = None
    max_prompt_chars: int | None = Field(default=None, ge=1, le=1_000_000)
    default_response_format: Literal["url", "b64_json"] | None = None
    backgrounds: list[str] | None = None
    moderations: list[str] | None = None
    compression: bool | None = None
    edits: bool | None = None
    input_fidelities: list[str] | None = None
    generates: bool | None = None
    max_images: int | None = Field(default=None, ge=1, le=16)
    mask: Literal["optional", "none", "required"] | None = None
    size_from_input: bool | None = None
    flux_extensions: bool | None = None
    watermark_extension: bool | None = None
    tuning: bool | None = None
    shutdown_date: date | None = None  # a TOML date: shutdown_date = 2026-12-01
    successor: str | None = None


class ProviderEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    concurrency: int = Field(ge=1, le=10_000)


class CatalogFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: dict[str, ModelEntry] = {}
    providers: dict[str, ProviderEntry] = {}
    shut_down: dict[str, str] = {}  # names no longer served upstream: the model to ask for instead


def load_catalog(path: Path | None, providers: set[str], defaults: dict[str, int]) -> Catalog:
    """The built-in catalog with the operator's file applied; `providers` are the names we can route to."""
    catalog = read("built-in catalog", BUILTIN, Catalog((), dict(defaults)), providers)
    if path is not None:
        catalog = read("QUBAX_CATALOG", path, catalog, providers)
    return catalog


def read(label: str, path: Traversable, base: Catalog, providers: set[str]) -> Catalog:
    """`base` with the catalog file at `path` applied; errors name the file as `label path: where: why`."""
    try:
        parsed = CatalogFile.model_validate(tomllib.loads(path.read_text()))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CatalogError(f"{label} {path}: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise CatalogError(f"{label} {path}: {where}: {first['msg']}") from exc
    try:
        return apply(parsed, base, providers)
    except CatalogError as exc:
        raise CatalogError(f"{label} {path}: {exc}") from exc


def apply(parsed: CatalogFile, base: Catalog, providers: set[str]) -> Catalog:
    for name in parsed.providers:
        known_provider(name, providers, "providers")
    models = {model.id: model for model in base.models}
    for model_id, entry in parsed.models.items():
        models[model_id] = build_model(model_id, entry, models, providers)
    claimed: dict[str, str] = {}
    for model in models.values():
        for name in (model.id, *model.aliases):
            if claimed.setdefault(name, model.id) != model.id:
                raise CatalogError(f"the name {name!r} is used by both {claimed[name]!r} and {model.id!r}")
    successors = [(f"shut_down.{name}", successor) for name, successor in parsed.shut_down.items()]
    successors += [(f"models.{model.id}.successor", model.successor) for model in models.values() if model.successor]
    for where, successor in successors:
        if successor not in models:
            raise CatalogError(f"{where}: no model named {successor!r}")
    concurrency = dict(base.concurrency) | {name: entry.concurrency for name, entry in parsed.providers.items()}
    return Catalog(tuple(models.values()), concurrency, dict(base.shut_down) | parsed.shut_down)


def build_model(model_id: str, entry: ModelEntry, models: dict[str, CatalogModel], providers: set[str]) -> CatalogModel:
    base = models.get(entry.like or model_id)
    if base is None and entry.like:
        raise CatalogError(f"models.{model_id}.like: no model named {entry.like!r}")
    changes = entry_changes(model_id, entry, base.routes if base else (), providers)
    if entry.like:  # a new model starts with no aliases, and no lifecycle, of its own
        changes = {"aliases": (), "shutdown_date": None, "successor": None} | changes
    if base is not None:
        model = dataclasses.replace(base, **changes)  # type: ignore[arg-type]
    elif missing := [name for name in REQUIRED if name not in changes]:
        raise CatalogError(
            f'models.{model_id}: a new model needs `like = "<existing model>"` to start from, '
            f"or all of {', '.join(REQUIRED)} (missing: {', '.join(missing)})"
        )
    else:
        model = CatalogModel(**changes)  # type: ignore[arg-type]
    check_model(model)
    return model


def entry_changes(
    model_id: str, entry: ModelEntry, built_in: tuple[Route, ...], providers: set[str]
) -> dict[str, object]:
    """The `CatalogModel` fields the entry sets."""
    copied = entry.model_dump(exclude={"like", *PRICE_KEYS, "sizes", "routes"}, exclude_none=True)
    changes: dict[str, object] = {"id": model_id}
    changes |= {name: tuple(value) if isinstance(value, list) else value for name, value in copied.items()}
    if entry.price is not None and entry.prices is not None:
        raise CatalogError(f"models.{model_id}: give `price` or `prices`, not both")
    changes |= price_changes(entry.price, entry.prices, entry.token_prices, entry.megapixel_price)
    if entry.sizes is not None:
        changes["sizes"] = build_sizes(model_id, entry.sizes)
    if entry.routes is not None:
        changes["routes"] = tuple(
            build_route(model_id, i, route, built_in, providers) for i, route in enumerate(entry.routes)
        )
    return changes


def check_model(model: CatalogModel) -> None:
    """What the loader's types cannot say: defaults among the model's options, and a price for every
    request it takes."""
    where = f"models.{model.id}"
    width, _, height = model.default_size.partition("x")
    if not (width.isdigit() and height.isdigit() and model.sizes.allows(int(width), int(height))):
        raise CatalogError(f"{where}.default_size {model.default_size!r} is not one of its sizes")
    if not model.routes:
        raise CatalogError(f"{where}.routes: a model needs at least one route")
    for key, default, options, names in (
        ("default_quality", model.default_quality, model.qualities, "qualities"),
        ("default_style", model.default_style, model.styles, "styles"),
    ):
        if default is not None and default not in options:
            raise CatalogError(f"{where}.{key} {default!r} is not one of its {names}")
    # A request's quality is one of the model's (`auto` resolves to the default) or the default itself.
    for quality in set(model.qualities) - {"auto"} | {model.default_quality}:
        if not any(price.size is None and price.quality in (None, quality) for price in model.prices):
            raise CatalogError(f"{where}.prices: none applies to quality {quality!r} at any size")


def build_sizes(model_id: str, sizes: list[str] | GridEntry | FreeEntry) -> Grid | Fixed | Free:
    if isinstance(sizes, FreeEntry):
        if sizes.min_pixels > sizes.max_pixels:
            raise CatalogError(f"models.{model_id}.sizes: min_pixels is larger than max_pixels")
        return Free(**sizes.model_dump())
    if isinstance(sizes, GridEntry):
        if sizes.min > sizes.max:
            raise CatalogError(f"models.{model_id}.sizes: min is larger than max")
        return Grid(sizes.min, sizes.max, sizes.step)
    for size in sizes:
        width, _, height = size.partition("x")
        if not (width.isdigit() and height.isdigit()):
            raise CatalogError(f"models.{model_id}.sizes: {size!r} is not WIDTHxHEIGHT")
    return Fixed(tuple(sizes))


def build_route(
    model_id: str, index: int, entry: RouteEntry, built_in: tuple[Route, ...], providers: set[str]
) -> Route:
    where = f"models.{model_id}.routes.{index}"
    known_provider(entry.provider, providers, f"{where}.provider")
    if entry.only_after not in (None, MODEL_NOT_SERVED):  # the one case a stand-in route exists for
        raise CatalogError(f"{where}.only_after: the one case is {MODEL_NOT_SERVED!r}")
    if entry.model is not None:
        return Route(entry.provider, entry.model, entry.only_after, entry.max_images)
    for route in built_in:
        if route.provider == entry.provider:
            return Route(route.provider, route.upstream_model, entry.only_after, entry.max_images or route.max_images)
    raise CatalogError(f"{where}: {entry.provider} has no built-in name for this model; set `model`")


def known_provider(name: str, providers: set[str], where: str) -> None:
    if name not in providers:
        raise CatalogError(f"{where}: unknown provider {name!r} (known: {', '.join(sorted(providers))})")
