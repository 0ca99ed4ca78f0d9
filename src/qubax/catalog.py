"""The model catalog: one declarative table of what we serve, its limits, prices and upstream routes."""

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from qubax.errors import InvalidRequest, ModelNotFound
from qubax.protocol import ImageGenerateRequest

MAX_PROMPT_CHARS = 4000
RESPONSE_FORMATS = ("url", "b64_json")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
MAX_SEED = 2**32 - 1
_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")  # ASCII digits, no leading zeros, nothing else


@dataclass(frozen=True)
class Route:
    """One upstream that can serve a model: a provider name and that provider's name for the model."""

    provider: str
    upstream_model: str


@dataclass(frozen=True)
class Grid:
    """Any width and height within [low, high] that are multiples of `step`."""

    low: int
    high: int
    step: int

    def allows(self, width: int, height: int) -> bool:
        return all(self.low <= side <= self.high and side % self.step == 0 for side in (width, height))

    def describe(self) -> str:
        return f"width and height must each be between {self.low} and {self.high} and a multiple of {self.step}"


@dataclass(frozen=True)
class Fixed:
    sizes: tuple[str, ...]

    def allows(self, width: int, height: int) -> bool:
        return f"{width}x{height}" in self.sizes

    def describe(self) -> str:
        return "supported sizes are " + ", ".join(self.sizes)


@dataclass(frozen=True)
class Price:
    """Price of one image; the first entry whose quality and size match (None = any) applies."""

    usd: Decimal
    quality: str | None = None
    size: str | None = None


@dataclass(frozen=True)
class CatalogModel:
    id: str
    owned_by: str
    created: int
    sizes: Grid | Fixed
    default_size: str
    max_n: int
    prices: tuple[Price, ...]
    routes: tuple[Route, ...]
    qualities: tuple[str, ...] = ("auto", "standard")
    default_quality: str | None = None
    styles: tuple[str, ...] = ()
    default_style: str | None = None
    aliases: tuple[str, ...] = ()

    def price(self, quality: str | None, size: str) -> Decimal:
        for entry in self.prices:
            if entry.quality in (None, quality) and entry.size in (None, size):
                return entry.usd
        raise LookupError(f"no price for {self.id} {quality} {size}")  # pragma: no cover - table bug


@dataclass(frozen=True, kw_only=True)
class ImageRequest:
    """The one internal request: a generation request checked against its model, every field resolved
    to a concrete value. The route builds it, the quota and the ledger read it, and each adapter gets it
    with `n` set to the images still missing."""

    model: CatalogModel
    prompt: str
    width: int
    height: int
    n: int
    response_format: str = "url"
    quality: str | None = None
    style: str | None = None
    output_format: str = "png"
    # FLUX extensions: adapters pass them on where their upstream takes them and ignore them otherwise.
    seed: int | None = None
    safety_tolerance: int | None = None

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def cost_per_image(self) -> Decimal:
        return self.model.price(self.quality, self.size)

    def cost_micros(self, images: int, test: bool) -> int:
        """What `images` of this request cost, in millionths of a US dollar; test keys pay nothing."""
        return 0 if test else int(self.cost_per_image * 1_000_000) * images


FLUX_GRID = Grid(256, 1440, 32)
ULTRA_SIZES = Fixed(
    (
        "3136x1344",
        "2752x1536",
        "2496x1664",
        "2368x1792",
        "2048x2048",
        "1792x2368",
        "1664x2496",
        "1536x2752",
        "1344x3136",
    )
)

MODELS: tuple[CatalogModel, ...] = (
    CatalogModel(
        id="flux-1.1-pro",
        owned_by="black-forest-labs",
        created=1727827200,
        sizes=FLUX_GRID,
        default_size="1024x768",
        max_n=4,
        prices=(Price(Decimal("0.04")),),
        routes=(
            Route("bfl", "flux-pro-1.1"),
            Route("fal", "fal-ai/flux-pro/v1.1"),
            Route("replicate", "black-forest-labs/flux-1.1-pro"),
            Route("together", "black-forest-labs/FLUX.1.1-pro"),
        ),
    ),
    CatalogModel(
        id="flux-1.1-pro-ultra",
        owned_by="black-forest-labs",
        created=1730851200,
        sizes=ULTRA_SIZES,
        default_size="2752x1536",
        max_n=4,
        prices=(Price(Decimal("0.06")),),
        routes=(
            Route("bfl", "flux-pro-1.1-ultra"),
            Route("fal", "fal-ai/flux-pro/v1.1-ultra"),
            Route("replicate", "black-forest-labs/flux-1.1-pro-ultra"),
        ),
    ),
    CatalogModel(
        id="flux-1-schnell",
        owned_by="black-forest-labs",
        created=1722470400,
        sizes=FLUX_GRID,
        default_size="1024x1024",
        max_n=4,
        prices=(Price(Decimal("0.003")),),
        routes=(
            Route("together", "black-forest-labs/FLUX.1-schnell"),
            Route("fal", "fal-ai/flux/schnell"),
            Route("replicate", "black-forest-labs/flux-schnell"),
        ),
    ),
    CatalogModel(
        id="dall-e-3",
        owned_by="openai",
        created=1698785189,
        sizes=Fixed(("1024x1024", "1792x1024", "1024x1792")),
        default_size="1024x1024",
        max_n=1,
        prices=(
            Price(Decimal("0.04"), "standard", "1024x1024"),
            Price(Decimal("0.08"), "standard"),
            Price(Decimal("0.08"), "hd", "1024x1024"),
            Price(Decimal("0.12"), "hd"),
        ),
        routes=(Route("openai", "dall-e-3"),),
        qualities=("auto", "standard", "hd"),
        default_quality="standard",
        styles=("vivid", "natural"),
        default_style="vivid",
    ),
)


@dataclass(frozen=True)
class Catalog:
    """The models this server offers (built-ins plus the operator's file) and per-provider settings."""

    models: tuple[CatalogModel, ...] = MODELS
    concurrency: Mapping[str, int] = field(default_factory=dict)  # per-key active-task caps by provider

    def find(self, model_id: str) -> CatalogModel:
        for model in self.models:
            if model_id == model.id or model_id in model.aliases:
                return model
        raise ModelNotFound(
            f"The model `{model_id}` does not exist or you do not have access to it. "
            "GET /v1/models lists the models this server offers."
        )

    def check(self, body: ImageGenerateRequest) -> ImageRequest:
        """Resolve defaults and enforce the model's limits; raise `InvalidRequest` naming the field."""
        model = self.find(body.model)
        if not body.prompt.strip():
            raise InvalidRequest("prompt must be a non-empty string.", param="prompt")
        if len(body.prompt) > MAX_PROMPT_CHARS:
            raise InvalidRequest(
                f"prompt is {len(body.prompt)} characters long; the maximum is {MAX_PROMPT_CHARS}.",
                param="prompt",
                code="string_above_max_length",
            )
        n = 1 if body.n is None else body.n
        if not 1 <= n <= model.max_n:
            only = "n=1 only" if model.max_n == 1 else f"n between 1 and {model.max_n}"
            raise InvalidRequest(f"{model.id} supports {only}; got n={n}.", param="n")
        width, height = parse_size(model, body.size)
        response_format = pick_option(model.id, "response_format", body.response_format, RESPONSE_FORMATS, "url")
        quality = pick_option(model.id, "quality", body.quality, model.qualities, model.default_quality)
        style = pick_option(model.id, "style", body.style, model.styles, model.default_style)
        output_format = pick_option(model.id, "output_format", body.output_format, OUTPUT_FORMATS, "png")
        check_range("seed", body.seed, 0, MAX_SEED)
        check_range("safety_tolerance", body.safety_tolerance, 0, 6)
        return ImageRequest(
            model=model,
            prompt=body.prompt,
            width=width,
            height=height,
            n=n,
            response_format=response_format or "url",
            quality=quality,
            style=style,
            output_format=output_format or "png",
            seed=body.seed,
            safety_tolerance=body.safety_tolerance,
        )


def check_range(param: str, value: int | None, low: int, high: int) -> None:
    if value is not None and not low <= value <= high:
        raise InvalidRequest(f"{param} must be between {low} and {high}; got {value}.", param=param)


def parse_size(model: CatalogModel, size: str | None) -> tuple[int, int]:
    text = model.default_size if size in (None, "auto") else size
    match = _SIZE.fullmatch(text or "")
    if match is None:
        raise InvalidRequest(
            f"Invalid size '{text}': expected WIDTHxHEIGHT, e.g. '{model.default_size}'.",
            param="size",
            code="invalid_size",
        )
    width, height = int(match[1]), int(match[2])
    if not model.sizes.allows(width, height):
        raise InvalidRequest(
            f"The size {text} is not supported by {model.id}: {model.sizes.describe()}.",
            param="size",
            code="invalid_size",
        )
    return width, height


def pick_option(
    model_id: str, param: str, value: str | None, allowed: tuple[str, ...], default: str | None
) -> str | None:
    if value is None:
        return default
    if value not in allowed:
        supported = ", ".join(f"'{v}'" for v in allowed) if allowed else "none (omit the parameter)"
        raise InvalidRequest(
            f"Invalid value for '{param}': '{value}'. Supported values for {model_id} are: {supported}.", param=param
        )
    return default if value == "auto" else value
