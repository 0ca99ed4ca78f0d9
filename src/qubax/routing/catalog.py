"""The model catalog: one declarative table of what we serve, its limits, prices and upstream routes."""

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from qubax.errors import InvalidRequest, ModelNotFound
from qubax.pipeline.uploads import InputImage
from qubax.protocol import UPLOAD_FIELDS, ImageEditRequest, ImageGenerateRequest, Usage

MAX_PROMPT_CHARS = 4000
RESPONSE_FORMATS = ("url", "b64_json")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
MAX_SEED = 2**32 - 1
DEFAULT_EDIT_MODEL = "gpt-image-1.5"  # as OpenAI's own default
_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")  # ASCII digits, no leading zeros, nothing else


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
        return (
            f"width and height must be multiples of {self.step}, at most {self.max_side}, with an aspect ratio "
            f"within 1:{self.max_ratio} and {self.max_ratio}:1 and {self.min_pixels:,} to {self.max_pixels:,} pixels"
        )


@dataclass(frozen=True)
class TokenPrices:
    """USD per million tokens, for models the upstream bills by token (GPT image models): what an image
    costs is known only from the upstream's `usage`."""

    text_input: Decimal
    image_input: Decimal
    image_output: Decimal

    def cost(self, usage: Usage) -> Decimal:
        details = usage.input_tokens_details
        spent = (
            details.text_tokens * self.text_input
            + details.image_tokens * self.image_input
            + usage.output_tokens * self.image_output
        )
        return spent / 1_000_000


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
    # GPT image models': None where the model takes no such parameter, or the client left it out.
    output_compression: int | None = None
    background: str | None = None
    moderation: str | None = None
    # Edits: the uploaded images (none for a generation), the mask, and how closely to keep to them.
    images: tuple[InputImage, ...] = ()
    mask: InputImage | None = None
    input_fidelity: str | None = None
    # FLUX extensions: adapters pass them on where their upstream takes them and ignore them otherwise.
    seed: int | None = None
    safety_tolerance: int | None = None
    # Streamed answers: how many partial images the client wants of each image, and where an adapter
    # whose upstream makes them hands each one (its index, base64) as it arrives.
    partial_images: int = 0
    on_partial: Callable[[int, str], None] | None = field(default=None, compare=False, repr=False)
    # Where the images asked for start among the client's: a streamed answer asks for each image apart,
    # and the test renderer labels each image by its place (#1, #2, ...).
    index: int = 0

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def cost_per_image(self) -> Decimal:
        """The price of one image, or for a token-billed model the estimate its budget is checked with."""
        return self.model.price(self.quality, self.size)

    def cost_micros(self, images: int, test: bool) -> int:
        """What `images` of this request cost at the price per image (for a token-billed model, the
        estimate), in millionths of a US dollar; test keys pay nothing."""
        return 0 if test else int(self.cost_per_image * 1_000_000) * images


@dataclass(frozen=True)
class Catalog:
    """The models this server offers (built-ins plus the operator's file) and per-provider settings."""

    models: tuple[CatalogModel, ...]
    concurrency: Mapping[str, int] = field(default_factory=dict)  # per-key active-task caps by provider
    shut_down: Mapping[str, str] = field(default_factory=dict)  # names no longer served: their successors

    def find(self, model_id: str) -> CatalogModel:
        for model in self.models:
            if model_id == model.id or model_id in model.aliases:
                return model
        raise ModelNotFound(
            f"The model `{model_id}` does not exist or you do not have access to it. "
            "GET /v1/models lists the models this server offers."
        )

    def asked(self, model_id: str) -> CatalogModel:
        """The model a request names; a name shut down upstream is a 400 that names its successor."""
        successor = self.shut_down.get(model_id)
        if successor is not None and not any(model_id in (model.id, *model.aliases) for model in self.models):
            raise InvalidRequest(
                f"The model `{model_id}` has been shut down upstream; use `{successor}`, its successor here.",
                param="model",
            )
        return self.find(model_id)

    def token_prices(self, model_id: str) -> "TokenPrices | None":
        """The token rates of the model an upstream call ran, when the catalog knows it by that name."""
        found = next((model for model in self.models if model.id == model_id), None)
        return found.token_prices if found else None

    def check_edit(self, form: ImageEditRequest) -> ImageRequest:
        """`check` for an edit's fields, with a model that edits; the uploads are checked apart."""
        model = self.asked(form.model or DEFAULT_EDIT_MODEL)
        if not model.edits:
            editors = ", ".join(m.id for m in self.models if m.edits)
            raise InvalidRequest(f"{model.id} does not edit images; models that do: {editors}.", param="model")
        fields = form.model_dump(exclude=UPLOAD_FIELDS | {"input_fidelity"})
        request = self.check(ImageGenerateRequest.model_validate(fields | {"model": model.id}), edit=True)
        fidelity = pick_option(model.id, "input_fidelity", form.input_fidelity, model.input_fidelities, None)
        return dataclasses.replace(request, input_fidelity=fidelity)

    def check_inputs(
        self, request: ImageRequest, size: str | None, images: tuple[InputImage, ...], mask: InputImage | None
    ) -> ImageRequest:
        """An edit's checked uploads against what its model takes, and added to the request; without a
        size asked, a model that follows its input makes the first image's aspect ratio."""
        model = request.model
        if len(images) > model.max_images:
            most = f"{model.max_images} image" + ("s" if model.max_images > 1 else "")
            raise InvalidRequest(f"{model.id} takes at most {most} to edit; got {len(images)}.", param="image")
        if mask is not None and model.mask == "none":
            raise InvalidRequest(
                f"{model.id} does not take a mask: it edits the whole image as the prompt says.", param="mask"
            )
        if mask is None and model.mask == "required" and not images[0].alpha:
            raise InvalidRequest(
                f"{model.id} needs a mask, or a first image whose transparent areas show where to paint.",
                param="mask",
                code="missing_required_parameter",
            )
        changes: dict[str, Any] = {"images": images, "mask": mask}
        if model.size_from_input and size in (None, "auto") and isinstance(model.sizes, Grid):
            changes["width"], changes["height"] = model.sizes.near(images[0].width, images[0].height)
        return dataclasses.replace(request, **changes)

    def check(self, body: ImageGenerateRequest, edit: bool = False) -> ImageRequest:
        """Resolve defaults and enforce the model's limits; raise `InvalidRequest` naming the field."""
        model = self.asked(body.model)
        if not (edit or model.generates):
            raise InvalidRequest(
                f"{model.id} only edits images: send an image and a mask to POST /v1/images/edits.", param="model"
            )
        if not body.prompt.strip():
            raise InvalidRequest("prompt must be a non-empty string.", param="prompt")
        if len(body.prompt) > model.max_prompt_chars:
            raise InvalidRequest(
                f"prompt is {len(body.prompt)} characters long; the maximum for {model.id} is "
                f"{model.max_prompt_chars}.",
                param="prompt",
                code="string_above_max_length",
            )
        check_range("partial_images", body.partial_images, 0, 3)
        if body.stream and body.response_format == "url":
            raise InvalidRequest(
                "A streamed answer carries its images as base64 (b64_json): leave response_format out.",
                param="response_format",
            )
        n = 1 if body.n is None else body.n
        if not 1 <= n <= model.max_n:
            only = "n=1 only" if model.max_n == 1 else f"n between 1 and {model.max_n}"
            raise InvalidRequest(f"{model.id} supports {only}; got n={n}.", param="n")
        width, height = parse_size(model, body.size)
        default_format = "b64_json" if body.stream else model.default_response_format
        response_format = pick_option(
            model.id, "response_format", body.response_format, RESPONSE_FORMATS, default_format
        )
        quality = pick_option(model.id, "quality", body.quality, model.qualities, model.default_quality)
        style = pick_option(model.id, "style", body.style, model.styles, model.default_style)
        output_format = pick_option(model.id, "output_format", body.output_format, OUTPUT_FORMATS, "png") or "png"
        for name, value in (("seed", body.seed), ("safety_tolerance", body.safety_tolerance)):
            if value is not None and not model.flux_extensions:
                raise InvalidRequest(f"{name} is a FLUX extension; {model.id} does not take it.", param=name)
        check_range("seed", body.seed, 0, MAX_SEED)
        check_range("safety_tolerance", body.safety_tolerance, 0, 6)
        return ImageRequest(
            **gpt_options(model, body, output_format),
            model=model,
            prompt=body.prompt,
            width=width,
            height=height,
            n=n,
            response_format=response_format or "url",
            quality=quality,
            style=style,
            output_format=output_format,
            seed=body.seed,
            safety_tolerance=body.safety_tolerance,
            partial_images=body.partial_images or 0,
        )


def gpt_options(model: CatalogModel, body: ImageGenerateRequest, output_format: str) -> dict[str, Any]:
    """`background`, `moderation` and `output_compression`, checked; None where left out (or `auto`)."""
    background = pick_option(model.id, "background", body.background, model.backgrounds, None)
    if background == "transparent" and output_format not in ("png", "webp"):
        raise InvalidRequest(
            f"A transparent background needs output_format png or webp; got {output_format}.", param="background"
        )
    compression = body.output_compression
    if compression is not None:
        if not model.compression:
            raise InvalidRequest(f"{model.id} does not take output_compression.", param="output_compression")
        if output_format == "png":
            raise InvalidRequest(
                "output_compression applies to jpeg and webp output, not png.", param="output_compression"
            )
        check_range("output_compression", compression, 0, 100)
    return {
        "background": background,
        "moderation": pick_option(model.id, "moderation", body.moderation, model.moderations, None),
        "output_compression": compression,
    }


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
