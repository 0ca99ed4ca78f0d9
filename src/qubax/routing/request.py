"""The one internal request type, `ImageRequest`, and the checks of the single fields it is made of: a
size against the model's sizes, an option against those the model takes, a number within its range.
Apart from `catalog` (which assembles a request from a client's body) because the pipeline, the
providers, the quota and the ledger all read the request, and none of them needs the catalog."""

import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from qubax.errors import InvalidRequest
from qubax.pipeline.uploads import InputImage
from qubax.protocol import ImageGenerateRequest
from qubax.routing.models import CatalogModel

MAX_SEED = 2**32 - 1
_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")  # ASCII digits, no leading zeros, nothing else


@dataclass(frozen=True)
class PartialImage:
    """A partial image an upstream streamed: of the request's image `image` (its `index`), the
    `partial_image_index`-th, base64."""

    image: int
    partial_image_index: int
    b64_json: str | bytes  # as the upstream sent it (`payload`)


class PartialImages(Protocol):
    """Where an adapter puts the partial images it receives: a queue the stream reads (data handed on,
    nothing of the pipeline's run by the adapter)."""

    def put_nowait(self, item: PartialImage, /) -> None: ...


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
    steps: int | None = None  # FLUX.2 [flex]'s
    guidance: float | None = None
    # Seedream extension: ModelArk's "AI generated" mark, off unless the client asked for it.
    watermark: bool = False
    # Streamed answers: how many partial images the client wants of each image, and where an adapter
    # whose upstream makes them puts each one as it arrives (the stream keeps to `partial_images`).
    partial_images: int = 0
    partials: PartialImages | None = field(default=None, compare=False, repr=False)
    # Where the images asked for start among the client's: a streamed answer asks for each image apart,
    # and the test renderer labels each image by its place (#1, #2, ...).
    index: int = 0

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def cost_per_image(self) -> Decimal:
        """The price of one image, or for a token-billed model the estimate its budget is checked with."""
        inputs = tuple((image.width, image.height) for image in self.images)  # where billed by megapixel
        return self.model.price(self.quality, self.size, inputs)

    def cost_micros(self, images: int, test: bool) -> int:
        """What `images` of this request cost at the price per image (for a token-billed model, the
        estimate), in millionths of a US dollar; test keys pay nothing."""
        return 0 if test else int(self.cost_per_image * 1_000_000) * images


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


def flux_options(model: CatalogModel, body: ImageGenerateRequest) -> dict[str, Any]:
    """The FLUX extensions, checked: each is a 400 naming it for a model that does not take it."""
    options = {"seed": body.seed, "safety_tolerance": body.safety_tolerance}
    tuning = {"steps": body.steps, "guidance": body.guidance}
    for name, value in (options | tuning).items():
        if value is not None and not (model.tuning if name in tuning else model.flux_extensions):
            raise InvalidRequest(f"{name} is a FLUX extension; {model.id} does not take it.", param=name)
    check_range("seed", body.seed, 0, MAX_SEED)
    check_range("safety_tolerance", body.safety_tolerance, 0, 6)
    check_range("steps", body.steps, 1, 50)
    check_range("guidance", body.guidance, 1.5, 10)
    return options | tuning


def check_range(param: str, value: float | None, low: float, high: float) -> None:
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
