"""Images uploaded for an edit: checked before any upstream is called, and kept where the framework put
them (a temporary file once past a megabyte), never read whole into memory here."""

import asyncio
import os
from dataclasses import dataclass
from typing import BinaryIO

from fastapi import UploadFile
from PIL import Image, UnidentifiedImageError

from qubax.errors import InvalidRequest

MAX_IMAGES = 16
MAX_IMAGE_BYTES = 50 * 1024 * 1024  # each, as OpenAI takes them
MAX_MASK_BYTES = 4 * 1024 * 1024
FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}


@dataclass(frozen=True)
class InputImage:
    """One uploaded image: its open file (rewind it before each read), and what its header says."""

    file: BinaryIO
    filename: str
    format: str  # png, jpeg or webp, from the bytes: the part's own Content-Type is the client's guess
    width: int
    height: int

    @property
    def content_type(self) -> str:
        return f"image/{self.format}"

    def reopen(self) -> BinaryIO:
        """A second handle on the file, at its start, for a sender that closes what it has sent (aiohttp
        does): the upload stays open for the next route. Both handles share one position."""
        self.file.flush()  # what the parser wrote may still sit in the handle's buffer
        self.file.seek(0)
        return os.fdopen(os.dup(self.file.fileno()), "rb")  # a spooled file still in memory moves to disk


async def read_uploads(
    images: list[UploadFile], mask: UploadFile | None
) -> tuple[tuple[InputImage, ...], InputImage | None]:
    """The images and the mask, each checked: a real PNG, JPEG or WebP within the size limits, at most
    MAX_IMAGES of them, and a mask that is a PNG the size of the first image. Raises `InvalidRequest`
    naming `image` or `mask`."""
    return await asyncio.to_thread(check_uploads, images, mask)  # file reads: off the event loop, in one hop


def check_uploads(
    images: list[UploadFile], mask: UploadFile | None
) -> tuple[tuple[InputImage, ...], InputImage | None]:
    if not images:
        raise InvalidRequest("Missing required parameter: 'image'.", param="image", code="missing_required_parameter")
    if len(images) > MAX_IMAGES:
        raise InvalidRequest(f"At most {MAX_IMAGES} images can be edited at once; got {len(images)}.", param="image")
    checked = tuple(inspect(upload, "image", MAX_IMAGE_BYTES) for upload in images)
    if mask is None:
        return checked, None
    found = inspect(mask, "mask", MAX_MASK_BYTES)
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


def inspect(upload: UploadFile, param: str, limit: int) -> InputImage:
    """What an uploaded file is, from its header alone (Pillow reads no pixels to open it)."""
    name = upload.filename or "upload"
    if upload.size is not None and upload.size > limit:
        raise InvalidRequest(f"{param} {name!r} is larger than {limit // (1024 * 1024)} MB.", param=param)
    upload.file.seek(0)
    try:
        with Image.open(upload.file) as image:
            kind, (width, height) = FORMATS.get(image.format or ""), image.size
    except (UnidentifiedImageError, OSError, ValueError):
        kind = None
    upload.file.seek(0)
    if kind is None:
        raise InvalidRequest(f"{param} {name!r} is not a PNG, JPEG or WebP image.", param=param)
    return InputImage(upload.file, name, kind, width, height)
