"""One entry of the catalog: a model we serve, the sizes it takes (`Grid`, `Fixed`, `Free`), what its
images cost (`Price`, `TokenPrices`, `MegapixelPrice`) and the upstreams that serve it (`Route`). Plain data that
`catalog_file` builds from the TOML tables and every part of the service reads; apart from `catalog`
so that `request.ImageRequest`, which carries its model, needs nothing of the catalog's lookups."""

import math
from dataclasses import dataclass
from datetime import date
from decimal import Decimal

from qubax.protocol import Usage

MAX_PROMPT_CHARS = 4000


@dataclass(frozen=True)
class Route:
    """One upstream that can serve a model: a provider name and that provider's name for the model."""

    provider: str
    upstream_model: str
    # Taken only when the route before it failed with this error code (a stand-in for one case), not
    # for every failure that moves a request on.
    only_after: str | None = None
    # The most input images this upstream takes in one edit, where fewer than the model's: a request with
    # more passes the route by.
    max_images: int | None = None


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

    def near(self, width: int, height: int, pixels: int = 1024 * 1024) -> tuple[int, int]:
        """The size on the grid of about `pixels` pixels nearest to the aspect ratio of width:height
        (kept within 21:9 and 9:21, FLUX's range)."""
        ratio = min(max(width / height, 9 / 21), 21 / 9)
        w, h = (pixels * ratio) ** 0.5, (pixels / ratio) ** 0.5
        shrink = min(1.0, self.high / max(w, h))
        return self.snap(w * shrink), self.snap(h * shrink)

    def snap(self, side: float) -> int:
        return min(self.high, max(self.low, round(side / self.step) * self.step))


@dataclass(frozen=True)
class Fixed:
    sizes: tuple[str, ...]

    def allows(self, width: int, height: int) -> bool:
        return f"{width}x{height}" in self.sizes

    def describe(self) -> str:
        return "supported sizes are " + ", ".join(self.sizes)


@dataclass(frozen=True)
class Free:
    """Any width and height that are multiples of `step`, within the bounds on side, aspect ratio and
    pixels (gpt-image-2)."""

    step: int
    max_side: int
    max_ratio: int
    min_pixels: int
    max_pixels: int

    def allows(self, width: int, height: int) -> bool:
        return (
            width % self.step == 0
            and height % self.step == 0
            and max(width, height) <= self.max_side
            and max(width, height) <= self.max_ratio * min(width, height)
            and self.min_pixels <= width * height <= self.max_pixels
        )

    def describe(self) -> str:
        multiples = f"multiples of {self.step}, " if self.step > 1 else ""  # Seedream takes any whole number
        return (
            f"width and height must be {multiples}at most {self.max_side}, with an aspect ratio "
            f"within 1:{self.max_ratio} and {self.max_ratio}:1 and {self.min_pixels:,} to {self.max_pixels:,} pixels"
        )


@dataclass(frozen=True)
class TokenPrices:
    """USD per million tokens, for models the upstream bills by token (GPT image models): what an image
    costs is known only from the upstream's `usage`."""

    text_input: Decimal
    image_input: Decimal
    image_output: Decimal
    # Text and thinking tokens out, where the upstream bills them apart from the image's (Gemini); without
    # it every output token is an image token.
    text_output: Decimal | None = None

    def cost(self, usage: Usage) -> Decimal:
        details, output = usage.input_tokens_details, usage.output_tokens_details
        image_out, text_out = usage.output_tokens, 0
        if self.text_output is not None and output is not None:
            image_out, text_out = output.image_tokens, usage.output_tokens - output.image_tokens
        spent = (
            details.text_tokens * self.text_input
            + details.image_tokens * self.image_input
            + image_out * self.image_output
            + text_out * (self.text_output or 0)
        )
        return spent / 1_000_000


@dataclass(frozen=True)
class MegapixelPrice:
    """USD by megapixel, as BFL bills FLUX.2: the output's first megapixel, then each further one, and each
    megapixel of an input image at the further rate. A megapixel is 1024x1024 pixels, counted up per image."""

    first: Decimal
    further: Decimal

    def cost(self, width: int, height: int, inputs: tuple[tuple[int, int], ...] = ()) -> Decimal:
        further = megapixels(width, height) - 1 + sum(megapixels(w, h) for w, h in inputs)
        return self.first + self.further * further


def megapixels(width: int, height: int) -> int:
    return max(1, math.ceil(width * height / (1024 * 1024)))


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
    sizes: Grid | Fixed | Free
    default_size: str
    max_n: int
    prices: tuple[Price, ...]  # per image; for token-billed models, the estimate budgets are checked with
    routes: tuple[Route, ...]
    qualities: tuple[str, ...] = ("auto", "standard")
    default_quality: str | None = None
    styles: tuple[str, ...] = ()
    default_style: str | None = None
    aliases: tuple[str, ...] = ()
    max_prompt_chars: int = MAX_PROMPT_CHARS
    default_response_format: str = "url"
    # GPT image models' own parameters; a model with none of them refuses each one.
    backgrounds: tuple[str, ...] = ()
    moderations: tuple[str, ...] = ()
    compression: bool = False  # takes output_compression
    token_prices: TokenPrices | None = None  # billed by the upstream's token count, not per image
    edits: bool = False  # takes `POST /v1/images/edits`
    input_fidelities: tuple[str, ...] = ()
    generates: bool = True  # takes `POST /v1/images/generations` (not so a model that only fills in)
    max_images: int = 16  # input images of one edit
    mask: str = "optional"  # "optional", "none" (refused), or "required" (a mask or a transparent first image)
    size_from_input: bool = False  # an edit without a size takes the first image's aspect ratio
    flux_extensions: bool = True  # takes `seed` and `safety_tolerance`
    watermark_extension: bool = False  # takes `watermark` (Seedream)
    tuning: bool = False  # takes `steps` and `guidance` (FLUX.2 [flex])
    megapixel_price: MegapixelPrice | None = None  # billed by megapixel; `prices` then holds the 1 MP price
    # Its lifecycle: the day its upstream stops (or stopped) serving it, and the model to ask for instead.
    shutdown_date: date | None = None
    successor: str | None = None

    def price(self, quality: str | None, size: str, inputs: tuple[tuple[int, int], ...] = ()) -> Decimal:
        """One image's price at `size` (`WxH`), an edit's input images' sizes counted where they are billed."""
        if self.megapixel_price is not None:
            width, _, height = size.partition("x")
            return self.megapixel_price.cost(int(width), int(height), inputs)
        for entry in self.prices:
            if entry.quality in (None, quality) and entry.size in (None, size):
                return entry.usd
        raise LookupError(f"no price for {self.id} {quality} {size}")  # pragma: no cover - table bug
