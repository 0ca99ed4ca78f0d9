"""Images uploaded for an edit: checked before any upstream is called, and kept where the framework put
them (a temporary file once past a megabyte), never read whole into memory here."""

import asyncio
import hashlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO, TypeVar

import pybase64
from fastapi import UploadFile
from PIL import Image, UnidentifiedImageError

from qubax.errors import InvalidRequest
from qubax.pipeline.imaging import MAX_PIXELS, PNG_SIGNATURE, fill_mask

MAX_IMAGES = 16
MAX_IMAGE_BYTES = 50 * 1024 * 1024  # each, as OpenAI takes them
MAX_MASK_BYTES = 4 * 1024 * 1024
FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
T = TypeVar("T")


@dataclass(frozen=True)
class Decoding:
    """The work uploads may cause: the most bytes of pixels one may decode to (`QUBAX_MAX_DECODE_BYTES`),
    and the bound on how many are decoded at once (`QUBAX_DECODE_CONCURRENCY`), one for the app."""

    budget: int
    gate: asyncio.Semaphore


def unbounded() -> Decoding:
    return Decoding(2**63, asyncio.Semaphore())


@dataclass(frozen=True)
class InputImage:
    """One uploaded image: its open file (rewind it before each read), and what its header says."""

    file: BinaryIO
    filename: str
    format: str  # png, jpeg or webp, from the bytes: the part's own Content-Type is the client's guess
    width: int
    height: int
    alpha: bool = False  # it has transparent areas (an alpha channel or a transparent colour)
    param: str = "image"  # the field it came in: `image` or `mask`
    cost: int = 0  # bytes its pixels take decoded, judged from its header (`decoded_bytes`)
    # The app's budget and bound on uploads decoded at once; an upload made alone has its own.
    decoding: Decoding = field(default_factory=unbounded, compare=False, repr=False)

    @property
    def content_type(self) -> str:
        return f"image/{self.format}"

    def rewind(self) -> BinaryIO:
        """The file at its start, with what the parser wrote out of its buffer."""
        self.file.flush()
        self.file.seek(0)
        return self.file

    def read(self) -> bytes:
        """The whole file (blocking: from a worker thread)."""
        return self.rewind().read()

    def reopen(self) -> BinaryIO:
        """A second handle on the file, at its start, for a sender that closes what it has sent (aiohttp
        does): the upload stays open for the next route. Both handles share one position."""
        # A spooled file still in memory moves to disk for its descriptor. The rewind may only have moved
        # within the file object's buffer: the descriptor goes to the start itself.
        handle = os.dup(self.rewind().fileno())
        os.lseek(handle, 0, os.SEEK_SET)
        return os.fdopen(handle, "rb")

    @property
    def decodable(self) -> bool:
        """Whether its pixels fit the decoding budget. Only what a route decodes is held to it: a file
        passed on to an upstream as it is costs us its bytes, not its pixels."""
        return self.cost <= self.decoding.budget

    async def decode(self, work: Callable[[Image.Image], T]) -> T:
        """`work` done on the image (opened, its pixels not yet read), in a worker thread, while no more
        than the app's bound of other uploads are being decoded; refused (400) past the budget, from its
        header, before any pixel is read."""
        if not self.decodable:
            budget = self.decoding.budget
            raise InvalidRequest(
                f"{self.param} {self.filename!r} ({self.width}x{self.height}) would take {self.cost // 2**20} MiB "
                f"to decode; this server decodes at most {budget // 2**20} MiB (QUBAX_MAX_DECODE_BYTES). "
                "Send a smaller image.",
                param=self.param,
            )
        async with self.decoding.gate:
            return await asyncio.to_thread(self.decode_now, work)

    def decode_now(self, work: Callable[[Image.Image], T]) -> T:
        data = self.read()
        try:
            with Image.open(io.BytesIO(data)) as image:
                return work(image)
        except (OSError, SyntaxError, ValueError) as exc:  # how Pillow says the pixels cannot be read
            raise InvalidRequest(
                f"{self.param} {self.filename!r} cannot be decoded: it is damaged ({exc}).", param=self.param
            ) from exc


@dataclass(frozen=True)
class EncodedInputs:
    """An edit's uploads as JSON upstreams take them: each image base64-encoded with its media type,
    and for a model that fills in, the mask in FLUX Fill's sense (white where to paint) as a PNG."""

    images: tuple[tuple[str, str], ...]  # (media type, base64)
    mask: str | None = None

    def data_uris(self) -> list[str]:
        return [f"data:{media_type};base64,{text}" for media_type, text in self.images]

    def mask_uri(self) -> str | None:
        return f"data:image/png;base64,{self.mask}" if self.mask is not None else None


async def encode_inputs(images: tuple[InputImage, ...], mask: InputImage | None, fill: bool) -> EncodedInputs | None:
    """The uploads encoded once per upstream call (None for a generation, which has none); with `fill`,
    the mask (or else the first image's transparent areas) made into a Fill mask."""
    if not images:
        return None
    encoded = await asyncio.to_thread(encode_now, images)
    if not fill:
        return EncodedInputs(encoded)
    painted = await (mask or images[0]).decode(fill_mask)
    return EncodedInputs(encoded, pybase64.b64encode_as_string(painted))


def encode_now(images: tuple[InputImage, ...]) -> tuple[tuple[str, str], ...]:
    return tuple((image.content_type, pybase64.b64encode_as_string(image.read())) for image in images)


async def digests(files: list[UploadFile]) -> list[bytes]:
    """Each upload's SHA-256, read from where the framework kept it (in a worker thread)."""
    return await asyncio.to_thread(lambda: [digest(file) for file in files])


def digest(upload: UploadFile) -> bytes:
    upload.file.seek(0)
    found = hashlib.sha256()
    while chunk := upload.file.read(1024 * 1024):
        found.update(chunk)
    upload.file.seek(0)
    return found.digest()


async def read_uploads(
    images: list[UploadFile], mask: UploadFile | None, decoding: Decoding
) -> tuple[tuple[InputImage, ...], InputImage | None]:
    """The images and the mask, each checked: a real PNG, JPEG or WebP within the size limits and the
    decoding budget, at most MAX_IMAGES of them, and a mask that is a PNG the size of the first image.
    Raises `InvalidRequest` naming `image` or `mask`."""
    return await asyncio.to_thread(check_uploads, images, mask, decoding)  # file reads: off the loop, in one hop


def check_uploads(
    images: list[UploadFile], mask: UploadFile | None, decoding: Decoding
) -> tuple[tuple[InputImage, ...], InputImage | None]:
    if not images:
        raise InvalidRequest("Missing required parameter: 'image'.", param="image", code="missing_required_parameter")
    if len(images) > MAX_IMAGES:
        raise InvalidRequest(f"At most {MAX_IMAGES} images can be edited at once; got {len(images)}.", param="image")
    checked = tuple(inspect(upload, "image", MAX_IMAGE_BYTES, decoding) for upload in images)
    if mask is None:
        return checked, None
    found = inspect(mask, "mask", MAX_MASK_BYTES, decoding)
    if found.format != "png":
        raise InvalidRequest(f"The mask must be a PNG image; got {found.format}.", param="mask")
    first = checked[0]
    if (found.width, found.height) != (first.width, first.height):
        raise InvalidRequest(
            f"The mask ({found.width}x{found.height}) must be the size of the first image "
            f"({first.width}x{first.height}).",
            param="mask",
        )
    return checked, found


def inspect(upload: UploadFile, param: str, limit: int, decoding: Decoding) -> InputImage:
    """What an uploaded file is, from its header alone (Pillow reads no pixels to open it)."""
    name = upload.filename or "upload"
    if upload.size is not None and upload.size > limit:
        raise InvalidRequest(f"{param} {name!r} is larger than {limit // (1024 * 1024)} MB.", param=param)
    upload.file.seek(0)
    header = upload.file.read(26)  # a PNG's signature and IHDR, to its bit depth
    upload.file.seek(0)
    alpha = False
    try:
        with Image.open(upload.file) as image:
            kind, (width, height) = FORMATS.get(image.format or ""), image.size
            alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    except Image.DecompressionBombError:
        raise InvalidRequest(f"{param} {name!r} has too many pixels to process.", param=param) from None
    except (UnidentifiedImageError, OSError, ValueError):
        kind = None
    upload.file.seek(0)
    if kind is None:
        raise InvalidRequest(f"{param} {name!r} is not a PNG, JPEG or WebP image.", param=param)
    if width * height > MAX_PIXELS:
        raise InvalidRequest(
            f"{param} {name!r} is {width}x{height}: more than {MAX_PIXELS // 1_000_000} million pixels.", param=param
        )
    if not whole(upload.file, kind):
        raise InvalidRequest(f"{param} {name!r} is cut short or damaged: not a whole {kind.upper()} file.", param=param)
    cost = decoded_bytes(width, height, header)
    return InputImage(upload.file, name, kind, width, height, alpha, param, cost, decoding)


def whole(file: BinaryIO, kind: str) -> bool:
    """Whether a PNG or JPEG is all there, found without decoding it, reading it in blocks: a PNG's
    chunks each as long as it says and matching its CRC, up to IEND (Pillow's `verify`); a JPEG's
    end-of-image marker after the start of its scans. (A WebP cut short does not open.)"""
    file.seek(0)
    try:
        with Image.open(file) as image:
            if kind == "png":
                image.verify()
            return kind != "jpeg" or has_end_marker(file)  # Pillow stopped reading at the first scan
    except (OSError, SyntaxError, ValueError):
        return False
    finally:
        file.seek(0)


def has_end_marker(file: BinaryIO) -> bool:
    """Whether what is left of a JPEG holds its end marker, FF D9. No scan holds those two bytes (a scan's
    FF is followed by 00 or a restart marker); a file cut short lacks them."""
    last = b""
    while block := file.read(1024 * 1024):
        if b"\xff\xd9" in last + block:
            return True
        last = block[-1:]
    return False


def decoded_bytes(width: int, height: int, header: bytes) -> int:
    """What decoding an image takes, judged from its header: 4 bytes a pixel (RGB or RGBA, as it is
    decoded and converted to), 8 for a PNG of 16 bits a sample (as much again to inflate)."""
    sixteen_bits = header.startswith(PNG_SIGNATURE) and header[24:25] == b"\x10"
    return width * height * (8 if sixteen_bits else 4)
