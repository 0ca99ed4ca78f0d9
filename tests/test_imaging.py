"""Normalising upstream images to PNG, and the placeholder renderer for test keys."""

import io
import random
import struct
import zlib
from collections.abc import Callable

import pytest
from PIL import Image

from qubax.errors import UpstreamError
from qubax.pipeline import imaging
from qubax.pipeline.imaging import convert, intact_png_size, render_placeholder

Pixel = tuple[int, ...]


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def palette_image() -> Image.Image:
    image = Image.new("P", (40, 30), 1)
    image.putpalette([0, 0, 0, 200, 100, 50] * 128)
    return image


@pytest.mark.parametrize(
    ("source", "fmt", "options", "mode", "pixel"),
    [
        (Image.new("RGB", (64, 48), (200, 30, 40)), "JPEG", {"quality": 95}, "RGB", (200, 30, 40)),
        (Image.new("RGB", (64, 48), (20, 130, 240)), "WEBP", {"lossless": True}, "RGB", (20, 130, 240)),
        (Image.new("RGBA", (64, 48), (10, 200, 30, 128)), "PNG", {}, "RGBA", (10, 200, 30, 128)),
        (Image.new("RGBA", (64, 48), (10, 200, 30, 128)), "WEBP", {"lossless": True}, "RGBA", (10, 200, 30, 128)),
        (palette_image(), "PNG", {}, "RGB", (200, 100, 50)),
        (palette_image(), "PNG", {"transparency": 0}, "RGBA", (200, 100, 50, 255)),
        (palette_image(), "GIF", {}, "RGB", (200, 100, 50)),
        (Image.new("L", (64, 48), 77), "PNG", {}, "RGB", (77, 77, 77)),
        (Image.new("LA", (64, 48), (77, 50)), "PNG", {}, "RGBA", (77, 77, 77, 50)),
        (Image.new("1", (64, 48), 1), "PNG", {}, "RGB", (255, 255, 255)),
        (Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG", {"quality": 95}, "RGB", (255, 0, 0)),
    ],
    ids=[
        "jpeg",
        "webp",
        "png-rgba",
        "webp-rgba",
        "palette",
        "palette-transparent",
        "gif",
        "grey",
        "grey-alpha",
        "bilevel",
        "cmyk-jpeg",
    ],
)
@pytest.mark.parametrize("size", [(64, 48), (32, 32), (200, 100)])
def test_to_png_converts_to_an_rgb_or_rgba_png_of_the_exact_size(
    source: Image.Image, fmt: str, options: dict[str, object], mode: str, pixel: Pixel, size: tuple[int, int]
) -> None:
    image = decode(convert(encode(source, fmt, **options), *size))
    assert image.size == size
    assert image.mode == mode
    centre = image.getpixel((size[0] // 2, size[1] // 2))
    assert isinstance(centre, tuple) and len(centre) == len(pixel)
    assert all(abs(got - want) <= 3 for got, want in zip(centre, pixel, strict=True)), centre


def test_png_of_the_right_size_and_mode_keeps_its_pixels() -> None:
    source = Image.linear_gradient("L").convert("RGB").resize((96, 64))
    image = decode(convert(encode(source, "PNG"), 96, 64))
    assert image.tobytes() == source.tobytes()


def blue_between_red(width: int, height: int) -> bytes:
    """Left and right quarters red, the middle half blue."""
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 4, height))
    image.paste((255, 0, 0), (width - width // 4, 0, width, height))
    return encode(image, "PNG")


def is_blue(pixel: object) -> bool:
    assert isinstance(pixel, tuple)
    red, green, blue = (int(channel) for channel in pixel[:3])
    return blue >= 200 and red <= 60 and green <= 60


@pytest.mark.parametrize(
    ("source", "target"),
    [((200, 100), (100, 100)), ((400, 200), (100, 100)), ((400, 200), (64, 64)), ((400, 200), (200, 200))],
)
def test_other_aspect_ratios_are_cropped_not_stretched(source: tuple[int, int], target: tuple[int, int]) -> None:
    image = decode(convert(blue_between_red(*source), *target))
    width, height = target
    assert image.size == target
    # Stretching would keep the red quarters at the left and right edges; cropping keeps only the blue middle.
    for point in [
        (0, 0),
        (0, height // 2),
        (width // 2, height // 2),
        (width - 1, height // 2),
        (width - 1, height - 1),
    ]:
        assert is_blue(image.getpixel(point)), (point, image.getpixel(point))


def test_a_tall_image_is_cropped_top_and_bottom() -> None:
    source = Image.new("RGB", (100, 400), (0, 0, 255))
    source.paste((255, 0, 0), (0, 0, 100, 100))
    source.paste((255, 0, 0), (0, 300, 100, 400))
    image = decode(convert(encode(source, "PNG"), 100, 100))
    assert all(is_blue(image.getpixel(point)) for point in [(50, 0), (50, 50), (50, 99)])


def truncated_jpeg() -> bytes:
    data = encode(Image.effect_noise((256, 256), 64).convert("RGB"), "JPEG")
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, truncated_jpeg(), b"\xff\xd8\xff"],
    ids=["empty", "text", "png-signature-only", "truncated-jpeg", "jpeg-magic-only"],
)
def test_unreadable_data_is_an_upstream_error(data: bytes) -> None:
    with pytest.raises(UpstreamError) as caught:
        convert(data, 64, 64)
    assert (caught.value.status_code, caught.value.code) == (502, "upstream_error")
    assert caught.value.message == "The upstream returned data that is not a readable image."


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ((9000, 8000), "The upstream returned an image too large to process."),  # 72 MP: over our 64 MP cap
        ((10_000, 10_000), "The upstream returned data that is not a readable image."),  # Pillow's bomb warning
    ],
    ids=["over-our-cap", "decompression-bomb"],
)
def test_huge_images_are_refused(size: tuple[int, int], message: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        convert(encode(Image.new("L", size), "PNG", compress_level=1), 64, 64)
    assert caught.value.message == message


def test_sixteen_bit_greyscale_keeps_its_tone() -> None:
    image = decode(convert(encode(Image.new("I;16", (16, 16), 32768), "PNG"), 16, 16))
    pixel = image.getpixel((8, 8))
    assert isinstance(pixel, tuple)
    assert all(120 <= channel <= 135 for channel in pixel[:3]), pixel


def test_placeholder_has_the_exact_size() -> None:
    for width, height in [(256, 256), (1024, 768), (1344, 3136), (3136, 1344)]:
        image = decode(render_placeholder("a cat", width, height, 0))
        assert (image.size, image.mode) == ((width, height), "RGB")


def test_placeholder_is_deterministic_per_prompt_and_index() -> None:
    first = render_placeholder("a lighthouse", 512, 256, 0)
    assert render_placeholder("a lighthouse", 512, 256, 0) == first
    assert render_placeholder("a lighthouse", 512, 256, 1) != first
    assert render_placeholder("a lighthouse!", 512, 256, 0) != first
    assert len({render_placeholder("p", 256, 256, i) for i in range(4)}) == 4


def test_placeholder_colours_depend_on_the_prompt() -> None:
    def corner(prompt: str) -> object:
        return decode(render_placeholder(prompt, 256, 256, 0)).getpixel((0, 128))

    assert len({corner(f"prompt {i}") for i in range(5)}) > 1


def noisy_png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.frombytes("RGB", (width, height), bytes(range(256)) * (width * height * 3 // 256)).save(out, "PNG")
    return out.getvalue()


def test_a_sound_png_of_the_right_size_passes_through_untouched() -> None:
    data = noisy_png(64, 32)
    assert intact_png_size(data) == (64, 32)
    assert convert(data, 64, 32) is data
    assert convert(data, 32, 32) is not data  # wrong size: decoded and cropped


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d[:-1],  # truncated inside IEND
        lambda d: d[: len(d) // 2],  # truncated mid-stream
        lambda d: d[:40] + bytes([d[40] ^ 1]) + d[41:],  # a flipped bit in IDAT's name: an unknown critical chunk
        lambda d: d[:33] + d[-12:],  # no IDAT: no pixels
        lambda d: d + b"trailing",  # something after IEND
        lambda d: b"\x89PNG\r\n\x1a\n",  # the signature alone
    ],
)
def test_damaged_pngs_are_not_passed_through(damage: Callable[[bytes], bytes]) -> None:
    assert intact_png_size(damage(noisy_png(64, 32))) is None


def test_the_chunks_crcs_are_not_what_is_checked() -> None:
    # TLS guards the bytes in transit; the check is for bodies cut short and files that are not PNGs.
    data = noisy_png(64, 32)
    wrong_crc = data[:29] + bytes([data[29] ^ 1]) + data[30:]  # IHDR's CRC
    assert intact_png_size(wrong_crc) == (64, 32)
    ancillary = data[:33] + struct.pack(">I", 3) + b"tEXt" + b"a\x00b" + b"\x00" * 4 + data[33:]
    assert intact_png_size(ancillary) == (64, 32)


def test_truncated_png_of_the_right_size_is_an_upstream_error() -> None:
    data = noisy_png(64, 32)
    with pytest.raises(UpstreamError):
        convert(data[: len(data) // 2], 64, 32)


def png_row_filters(data: bytes) -> set[int]:
    """The filter type each row of an 8-bit PNG starts with (0 none, 1 sub, 2 up, 3 average, 4 Paeth)."""
    width, height = struct.unpack(">II", data[16:24])
    channels = {0: 1, 4: 2, 2: 3, 6: 4}[data[25]]
    offset, stream = 8, b""
    while offset < len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        if data[offset + 4 : offset + 8] == b"IDAT":
            stream += data[offset + 8 : offset + 8 + length]
        offset += 12 + length
    raw, stride = zlib.decompress(stream), 1 + width * channels
    return {raw[row * stride] for row in range(height)}


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA"])
def test_pngs_are_written_by_libvips_with_one_filter_and_lose_nothing(mode: str) -> None:
    source = Image.frombytes("RGBA", (96, 40), random.Random(1).randbytes(96 * 40 * 4)).convert(mode)
    data = imaging.encode(source)
    assert png_row_filters(data) == {1}  # sub, every row: Pillow would choose a filter per row
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.mode == mode and decoded.tobytes() == source.tobytes()


def photo(mode: str = "RGB", size: tuple[int, int] = (64, 32)) -> Image.Image:
    return Image.frombytes("RGB", size, random.Random(2).randbytes(size[0] * size[1] * 3)).convert(mode)


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_a_whole_jpeg_or_webp_of_the_asked_size_passes_through_untouched(fmt: str) -> None:
    data = encode(photo(), fmt.upper(), quality=80)
    assert convert(data, 64, 32, fmt) is data  # no decode, no second generation of loss
    assert convert(data, 32, 32, fmt) is not data  # another size: made anew


def rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[imaging.ORIENTATION] = 6  # shown turned a quarter: convert turns the pixels instead
    return encode(photo(size=(32, 64)), "JPEG", exif=exif)


@pytest.mark.parametrize(
    ("made", "fmt"),
    [
        (lambda: encode(photo(), "JPEG") + b"\0", "jpeg"),  # something after the EOI marker
        (lambda: encode(photo("L"), "JPEG"), "jpeg"),  # greyscale: convert makes it RGB
        (lambda: encode(photo("CMYK"), "JPEG"), "jpeg"),
        (rotated_jpeg, "jpeg"),
        (lambda: encode(photo(), "WEBP", save_all=True, append_images=[photo("L").convert("RGB")]), "webp"),
        (lambda: encode(photo(), "PNG"), "jpeg"),  # another format than the one asked
    ],
)
def test_jpegs_and_webps_that_need_converting_are_converted(made: Callable[[], bytes], fmt: str) -> None:
    data = made()
    out = convert(data, 64, 32, fmt)
    assert out is not data
    with Image.open(io.BytesIO(out)) as image:
        assert (image.format, image.size, image.mode) == (fmt.upper(), (64, 32), "RGB")
        assert getattr(image, "n_frames", 1) == 1


@pytest.mark.parametrize(
    ("data", "fmt"),
    [(encode(photo(), "JPEG")[:-2], "jpeg"), (encode(photo(), "WEBP")[:-4], "webp")],  # no EOI; short of RIFF's size
)
def test_a_jpeg_or_webp_cut_short_is_not_passed_through_but_refused(data: bytes, fmt: str) -> None:
    assert imaging.sound_header(data, fmt) is None
    with pytest.raises(UpstreamError):
        convert(data, 64, 32, fmt)


FORMATS = ["png", "jpeg", "webp"]


@pytest.mark.parametrize("asked", FORMATS)
@pytest.mark.parametrize("upstream", FORMATS)
def test_every_format_pair_is_converted_to_the_asked_format_and_size(upstream: str, asked: str) -> None:
    sent = encode(Image.new("RGB", (96, 48), (20, 130, 240)), upstream.upper(), quality=95)
    for size in ((96, 48), (48, 48)):  # the same size (passed through or re-encoded) and another
        out = convert(sent, *size, asked)
        if upstream == asked and size == (96, 48):
            assert out is sent
        with Image.open(io.BytesIO(out)) as image:
            assert (image.format, image.size, image.mode) == (asked.upper(), size, "RGB")
            red, green, blue = image.convert("RGB").getpixel((size[0] // 2, 24))  # type: ignore[misc]
            assert abs(red - 20) <= 4 and abs(green - 130) <= 4 and abs(blue - 240) <= 4
