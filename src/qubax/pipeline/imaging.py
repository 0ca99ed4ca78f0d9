"""Pixel work: normalising upstream output to the size and format asked for, and test-key placeholders.

Everything here is CPU-bound and synchronous; callers run it in a worker thread.
"""

import hashlib
import io
import struct
import warnings

import pyvips
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from qubax.errors import UpstreamError

# PNGs are written by libvips, every row with the `sub` filter, at zlib level 3: about 0.3x the CPU of
# Pillow at the same level (which tries every filter on every row), for files 1.0-1.06x the size
# (bench/README.md, "which PNG encoder"). Levels 1 and below are zlib-ng's quick strategy: far larger.
PNG_COMPRESS_LEVEL = 3
PNG_FILTER = pyvips.enums.ForeignPngFilter.SUB
VIPS_MODES = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}  # 8 bits a sample, as libvips takes them from memory
MAX_PIXELS = 64_000_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CRITICAL_CHUNKS = (b"IHDR", b"PLTE", b"IDAT", b"IEND")
RGB_8BIT = (b"\x08\x02", b"\x08\x06")  # IHDR bit depth and colour type: 8-bit RGB and RGBA
ORIENTATION = 0x0112  # the EXIF tag `convert` applies (exif_transpose)


def passes_through(data: bytes, width: int, height: int, output_format: str) -> bool:
    """Whether `data` already is what `convert` would make, so decoding and re-encoding would only cost
    time (and, for JPEG and WebP, a generation of loss). Judged from the file's structure, never by
    decoding it: a PNG's chunks (`intact_png_size`), a JPEG's or WebP's header and end."""
    if output_format == "png":
        return intact_png_size(data) == (width, height) and data[24:26] in RGB_8BIT
    return sound_header(data, output_format) == (width, height)


def sound_header(data: bytes, output_format: str) -> tuple[int, int] | None:
    """(width, height) of a whole JPEG or WebP that needs nothing of `convert`: RGB(A), one frame, upright
    (no EXIF rotation to apply), and not cut short (a JPEG ends with its EOI marker, a WebP's RIFF size
    is its length); else None. Pillow reads only the header for this."""
    if output_format == "jpeg":
        whole = data.startswith(b"\xff\xd8") and data.endswith(b"\xff\xd9")
    else:
        whole = data[:4] == b"RIFF" and data[8:12] == b"WEBP" and int.from_bytes(data[4:8], "little") + 8 == len(data)
    if not whole:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            modes = ("RGB",) if output_format == "jpeg" else ("RGB", "RGBA")
            if image.format != output_format.upper() or image.mode not in modes or getattr(image, "n_frames", 1) != 1:
                return None
            if image.getexif().get(ORIENTATION, 1) != 1:
                return None
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


def convert(data: bytes, width: int, height: int, output_format: str = "png") -> bytes:
    """Decode any image Pillow reads; return it at exactly width x height as png, jpeg or webp."""
    if passes_through(data, width, height, output_format):
        return data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_PIXELS:
                raise UpstreamError("The upstream returned an image too large to process.")
            image.load()
    except (
        UnidentifiedImageError,
        OSError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
        ValueError,
    ) as exc:
        raise UpstreamError("The upstream returned data that is not a readable image.") from exc
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: scale down, or convert() clips to white
        image = image.point(lambda value: value / 256).convert("L")
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
    if image.size != (width, height):
        # Crop to the requested aspect ratio, then scale: never stretch the picture.
        image = ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)
    return encode(image, output_format)


def intact_png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a structurally whole PNG, else None: its chunks' lengths lead from the
    signature to an IEND that ends the file, and every critical chunk is one PNG defines (IHDR first,
    at least one IDAT). Read from the chunk headers alone, a few hundred of them for a large image.

    This catches what reaches us broken: a body cut short, something that is not a PNG, trailing
    bytes. The chunks' CRCs are not computed: TLS already authenticates every byte in transit, and
    checking them cost a tenth of a large image's request. Nor is the pixel stream inflated: proving it
    costs more than the rest of a request and guards only against an encoder that wraps a cut-short
    stream in valid chunks, which no upstream we route to has been seen to do.
    """
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    offset, end, pixels = 8, len(data), False
    while offset + 12 <= end:
        (length,) = struct.unpack_from(">I", data, offset)
        kind = data[offset + 4 : offset + 8]
        offset += 12 + length
        if offset > end or (kind[:1].isupper() and kind not in CRITICAL_CHUNKS):  # an upper-case first letter: critical
            return None
        pixels = pixels or kind == b"IDAT"
        if kind == b"IEND":
            return struct.unpack_from(">II", data, 16) if offset == end and pixels else None
    return None


def fill_mask(image: Image.Image) -> bytes:
    """OpenAI's mask (paint where the image is transparent) as FLUX Fill takes one: a greyscale PNG,
    white where to paint, black where to keep."""
    with_alpha = image if image.mode in ("RGBA", "LA") else image.convert("RGBA")  # no copy when it has one
    return encode(ImageOps.invert(with_alpha.getchannel("A")))


def fitted(image: Image.Image, width: int, height: int) -> Image.Image:
    """The image cropped and scaled to width x height, in RGB; a JPEG decoded at the smallest of its
    scales (1/2 to 1/8, its draft mode) that still covers that size, for a fraction of the work."""
    image.draft("RGB", (width, height))
    # RGB is scaled as it was decoded, with no converted copy at full size (RGBA still gets one: Pillow
    # scales it premultiplied); other modes are converted first, as scaling needs.
    source = image if image.mode in ("RGB", "RGBA") else image.convert("RGB")
    return ImageOps.fit(source, (width, height)).convert("RGB")


def coarser(data: bytes, factor: int, output_format: str) -> bytes:
    """The image in blocks of `factor` pixels, at its size: a test key's stand-in for a partial image."""
    with Image.open(io.BytesIO(data)) as image:
        return encode(image.reduce(factor).resize(image.size, Image.Resampling.NEAREST), output_format)


def encode(image: Image.Image, output_format: str = "png") -> bytes:
    if output_format == "png" and image.mode in VIPS_MODES:
        return encode_png(image)
    out = io.BytesIO()
    if output_format == "png":
        image.save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif output_format == "jpeg":
        image.convert("RGB").save(out, format="JPEG", quality=95)  # JPEG has no alpha channel
    else:
        image.save(out, format="WEBP", quality=95)
    return out.getvalue()


def encode_png(image: Image.Image) -> bytes:
    # libvips' operation cache would keep recent operations, and so their pixel buffers, alive; every
    # image written here is a new one, so nothing would ever be found in it.
    pyvips.cache_set_max(0)
    pixels = pyvips.Image.new_from_memory(image.tobytes(), image.width, image.height, VIPS_MODES[image.mode], "uchar")
    data: bytes = pixels.pngsave_buffer(compression=PNG_COMPRESS_LEVEL, filter=PNG_FILTER)
    return data


def render_placeholder(prompt: str, width: int, height: int, index: int, base: Image.Image | None = None) -> bytes:
    """A deterministic stand-in image for test keys: colours from the prompt (or, for an edit, the
    `base` image, already `fitted` to the size), clearly labelled."""
    seed = hashlib.sha256(f"{index}:{prompt}".encode()).digest()
    start, end = tuple(seed[0:3]), tuple(seed[3:6])
    if base is not None:
        image = base.copy()  # drawn on: the base serves every image of the request
    else:
        gradient = Image.linear_gradient("L").resize((width, height))
        image = Image.composite(
            Image.new("RGB", (width, height), end), Image.new("RGB", (width, height), start), gradient
        )
    draw = ImageDraw.Draw(image)
    step = max(16, min(width, height) // 8)
    for x in range(0, width + height, step * 2):  # diagonal stripes: unmistakably not a real picture
        draw.line([(x, 0), (x - height, height)], fill=tuple(seed[6:9]), width=max(2, step // 6))
    label = f"QUBAX TEST IMAGE #{index + 1}\n{width}x{height}\n{prompt[:60]}"
    font_size = max(10, min(width, height) // 16)
    box = draw.multiline_textbbox((0, 0), label, font_size=font_size)
    origin = ((width - box[2]) // 2, (height - box[3]) // 2)
    pad = font_size // 2
    draw.rectangle(
        (origin[0] - pad, origin[1] - pad, origin[0] + box[2] + pad, origin[1] + box[3] + pad), fill=(255, 255, 255)
    )
    draw.multiline_text(origin, label, fill=(0, 0, 0), font_size=font_size)
    return encode(image)
