"""FLUX Kontext and Fill edits end to end: the official SDK → our app → each fake upstream over loopback."""

import asyncio
import base64
import concurrent.futures
import functools
import io
import random
import struct
import threading
import time
import zlib
from typing import Any

import openai
import pytest
from PIL import Image

from qubax.pipeline.imaging import PNG_SIGNATURE, fill_mask, fitted
from qubax.server.settings import Settings
from tests.catalog import MODELS
from tests.fakes import decode_data_uri, decode_image
from tests.stack import Stack, running_stack
from tests.test_upstreams import generations, picture

FLUX_EDITORS = [model for model in MODELS if model.edits and model.id.startswith("flux")]
FLUX_EDIT_ROUTES = [(model.id, route.provider) for model in FLUX_EDITORS for route in model.routes]


def half_transparent(width: int, height: int) -> bytes:
    """An OpenAI mask: its left half transparent (paint there), its right half opaque (keep)."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    out = io.BytesIO()
    mask.save(out, "PNG")
    return out.getvalue()


def sent(stack: Stack, provider: str) -> tuple[list[Image.Image], Image.Image | None]:
    """The input images and the mask the last call to `provider` carried, decoded."""
    if provider == "bfl":
        body = stack.bfl.submissions[-1]
        names = ("image", "input_image", "input_image_2", "input_image_3", "input_image_4")
        images = [decode_image(body[name]) for name in names if name in body]
        mask = decode_image(body["mask"]) if "mask" in body else None
    elif provider == "fal":
        body = stack.fal.submissions[-1]
        uris = [body["image_url"]] if "image_url" in body else body.get("image_urls", [])
        images = [decode_data_uri(uri) for uri in uris]
        mask = decode_data_uri(body["mask_url"]) if "mask_url" in body else None
    else:
        body = stack.replicate.creates[-1]["input"]
        uris = [body[name] for name in ("image", "input_image") if name in body] + body.get("input_images", [])
        images = [decode_data_uri(uri) for uri in uris]
        mask = decode_data_uri(body["mask"]) if "mask" in body else None
    assert all(image is not None for image in images)
    return [image for image in images if image is not None], mask


@pytest.mark.slow  # a stack per route
@pytest.mark.parametrize(("model", "provider"), FLUX_EDIT_ROUTES)
def test_a_flux_edit_through_every_route(settings: Settings, model: str, provider: str) -> None:
    """The image (and for Fill the mask, turned into white-where-to-paint) reaches the upstream; the
    answer takes the first image's aspect ratio at about a megapixel, and costs the model's price."""
    catalog = f'[models."{model}"]\nroutes = [{{ provider = "{provider}" }}]\n'
    fill = model == "flux-1-fill-pro"
    with running_stack(settings, catalog=catalog, providers=(provider,)) as stack:
        extra: dict[str, Any] = {"mask": ("m.png", half_transparent(300, 200))} if fill else {}
        raw = stack.live.images.with_raw_response.edit(
            model=model, image=("a.png", picture(300, 200)), prompt="make it night", response_format="b64_json", **extra
        )
        assert raw.headers["x-qubax-route"] == provider
        [made] = raw.parse().data
        assert Image.open(io.BytesIO(base64.b64decode(made.b64_json or ""))).size == (1248, 832)
        images, mask = sent(stack, provider)
        assert [image.size for image in images] == [(300, 200)]
        if fill:
            assert mask is not None and mask.size == (300, 200)
            assert mask.convert("L").getpixel((10, 10)) == 255 and mask.convert("L").getpixel((290, 10)) == 0
        else:
            assert mask is None
        [row] = generations(stack.settings)
        price = next(m for m in MODELS if m.id == model).price(None, "1248x832", ((300, 200),))  # FLUX.2: by MP
        assert (row.outcome, row.cost_micros) == ("ok", int(price * 1_000_000))


@pytest.mark.parametrize("provider", ["bfl", "fal"])
def test_kontext_edits_several_images_where_the_upstream_takes_them(settings: Settings, provider: str) -> None:
    catalog = f'[models."flux-kontext-max"]\nroutes = [{{ provider = "{provider}" }}]\n'
    with running_stack(settings, catalog=catalog, providers=(provider,)) as stack:
        response = stack.live.images.edit(
            model="flux-kontext-max",
            image=[("a.png", picture(64, 64)), ("b.jpg", picture(80, 40, "JPEG")), ("c.webp", picture(30, 60, "WEBP"))],
            prompt="put them in one room",
            size="1024x768",
            n=2,
            response_format="url",
        )
        assert len(response.data) == 2
        images, _ = sent(stack, provider)
        assert [image.size for image in images] == [(64, 64), (80, 40), (30, 60)]
        if provider == "fal":
            assert stack.fal.models[-1] == "fal-ai/flux-pro/kontext/max/multi"
            assert stack.fal.submissions[-1]["aspect_ratio"] == "4:3"
        else:
            assert stack.bfl.submissions[-1]["aspect_ratio"] == "4:3"


def test_kontext_without_an_image_draws_from_the_prompt(settings: Settings) -> None:
    catalog = '[models."flux-kontext-pro"]\nroutes = [{ provider = "fal" }]\n'
    with running_stack(settings, catalog=catalog, providers=("fal",)) as stack:
        response = stack.live.images.generate(
            model="flux-kontext-pro", prompt="a teapot", size="1280x720", response_format="b64_json"
        )
        assert len(response.data) == 1
        assert stack.fal.models == ["fal-ai/flux-pro/kontext/text-to-image"]
        assert stack.fal.submissions[0]["aspect_ratio"] == "16:9"


def test_a_route_that_takes_one_image_is_passed_by_for_several(settings: Settings) -> None:
    """Replicate's Kontext takes one input image: with two, BFL (after it) serves; with Replicate alone,
    the request is refused naming `image`."""
    catalog = '[models."flux-kontext-pro"]\nroutes = [{ provider = "replicate" }, { provider = "bfl" }]\n'
    two = [("a.png", picture(64, 64)), ("b.png", picture(64, 64))]
    with running_stack(settings, catalog=catalog, providers=("replicate", "bfl")) as stack:
        raw = stack.live.images.with_raw_response.edit(model="flux-kontext-pro", image=two, prompt="p")
        assert raw.headers["x-qubax-route"] == "bfl" and stack.replicate.creates == []
    alone = '[models."flux-kontext-pro"]\nroutes = [{ provider = "replicate" }]\n'
    with running_stack(settings, catalog=alone, providers=("replicate",)) as stack:
        with pytest.raises(openai.BadRequestError) as caught:
            stack.live.images.edit(model="flux-kontext-pro", image=two, prompt="p")
        assert caught.value.param == "image" and stack.replicate.creates == []


def test_a_failing_fill_route_hands_over_to_the_next(settings: Settings) -> None:
    with running_stack(settings, providers=("bfl", "fal", "replicate")) as stack:
        stack.bfl.submit_status = 500
        raw = stack.live.images.with_raw_response.edit(
            model="flux-1-fill-pro",
            image=("a.png", picture(256, 256)),
            mask=("m.png", half_transparent(256, 256)),
            prompt="a window",
            size="512x512",
        )
        assert raw.headers["x-qubax-route"] == "fal"
        assert len(raw.parse().data) == 1
        _, mask = sent(stack, "fal")
        assert mask is not None and mask.convert("L").getpixel((5, 5)) == 255


def test_fill_takes_the_transparent_areas_of_its_image_as_the_mask(settings: Settings) -> None:
    with running_stack(settings, providers=("bfl",)) as stack:
        stack.live.images.edit(model="flux-1-fill-pro", image=("a.png", half_transparent(256, 128)), prompt="sky")
        _, mask = sent(stack, "bfl")
        assert mask is not None and mask.convert("L").getpixel((5, 5)) == 255
        assert mask.convert("L").getpixel((250, 5)) == 0


def test_flux_edits_through_the_async_client(settings: Settings) -> None:
    async def edit(stack: Stack) -> int:
        async with openai.AsyncOpenAI(api_key=stack.live_key, base_url=stack.url + "/v1", max_retries=0) as client:
            response = await client.images.edit(
                model="flux-kontext-pro", image=("a.png", picture(100, 100)), prompt="p", n=3
            )
            return len(response.data)

    with running_stack(settings, providers=("bfl",)) as stack:
        assert asyncio.run(edit(stack)) == 3
        assert len(stack.bfl.submissions) == 3


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.cache
def zeros_png(width: int, height: int, depth: int = 16) -> bytes:
    """A transparent RGBA PNG of `depth` bits a sample, made cheaply: its rows of zeros deflate in blocks
    of 100 rows that a full flush makes alike, so one is compressed and repeated. 8000x8000 at 16 bits:
    512 MB of samples in half a megabyte."""
    rows = 100
    assert height % rows == 0
    block = bytes((1 + width * 4 * depth // 8) * rows)  # each row: its filter byte, then its samples
    squeeze = zlib.compressobj(9)
    first = squeeze.compress(block) + squeeze.flush(zlib.Z_FULL_FLUSH)
    again = squeeze.compress(block) + squeeze.flush(zlib.Z_FULL_FLUSH)  # without the zlib header
    checksum = 1
    for _ in range(height // rows):
        checksum = zlib.adler32(block, checksum)
    end = squeeze.flush()[:-4] + struct.pack(">I", checksum)  # the checksum of every block, not of three
    header = struct.pack(">IIBBBBB", width, height, depth, 6, 0, 0, 0)
    body = first + again * (height // rows - 1) + end
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_an_upload_that_would_decode_past_the_budget_is_refused_from_its_header(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An 8000x8000 PNG of 16-bit RGBA (half a megabyte, 512 MB of samples) is never decoded: where a
    route would decode it (the Fill mask) it is a 400 naming `image`; where it is sent on as it is
    (Kontext), it goes; a test key draws without it, as its live twin would take it."""
    decoded: list[tuple[int, int]] = []

    def counted_fill_mask(image: Image.Image) -> bytes:
        decoded.append(image.size)
        return fill_mask(image)

    def counted_fitted(image: Image.Image, width: int, height: int) -> Image.Image:
        decoded.append(image.size)
        return fitted(image, width=width, height=height)

    monkeypatch.setattr("qubax.pipeline.uploads.fill_mask", counted_fill_mask)
    monkeypatch.setattr("qubax.providers.placeholder.fitted", counted_fitted)
    huge = ("huge.png", zeros_png(8000, 8000))
    with running_stack(settings, providers=("bfl",)) as stack:
        with pytest.raises(openai.BadRequestError) as caught:
            stack.live.images.edit(model="flux-1-fill-pro", image=huge, prompt="sky")
        assert caught.value.param == "image"
        assert "'huge.png' (8000x8000) would take 488 MiB to decode" in caught.value.message
        assert stack.bfl.submissions == []
        assert len(stack.live.images.edit(model="flux-kontext-pro", image=huge, prompt="sky").data) == 1
        assert len(stack.test.images.edit(model="gpt-image-1.5", image=huge, prompt="sky").data) == 1
        assert decoded == [] and len(stack.bfl.submissions) == 1
        # At 8 bits a sample, a quarter of the size is within the default budget of 128 MiB.
        stack.live.images.edit(model="flux-1-fill-pro", image=("half.png", zeros_png(4000, 4000, 8)), prompt="sky")
        assert decoded == [(4000, 4000)] and len(stack.bfl.submissions) == 2


def test_uploads_are_decoded_a_bounded_number_at_a_time(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """With `QUBAX_DECODE_CONCURRENCY=1`, four Fill edits at once decode their masks one after another."""
    lock, running, most = threading.Lock(), [0], [0]

    def slow_fill_mask(image: Image.Image) -> bytes:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.2)  # long enough for the others to arrive, were they let in
        with lock:
            running[0] -= 1
        return fill_mask(image)

    monkeypatch.setattr("qubax.pipeline.uploads.fill_mask", slow_fill_mask)
    with running_stack(settings, providers=("bfl",), decode_concurrency=1) as stack:

        def edit(_: int) -> int:
            image = ("a.png", half_transparent(64, 64))
            return len(stack.live.images.edit(model="flux-1-fill-pro", image=image, prompt="sky").data)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            assert list(pool.map(edit, range(4))) == [1] * 4
    assert most == [1]


def cut_short(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


def noise(width: int, height: int, kind: str, mode: str = "RGB") -> bytes:
    """An image that does not compress (its last third holds pixels), as PNG or JPEG."""
    out = io.BytesIO()
    Image.frombytes(mode, (width, height), random.Random(7).randbytes(width * height * len(mode))).save(out, kind)
    return out.getvalue()


@pytest.mark.parametrize(
    ("model", "provider", "field", "data"),
    [
        ("flux-kontext-pro", "bfl", "image", cut_short(noise(64, 64, "PNG"))),
        ("flux-kontext-pro", "bfl", "image", cut_short(noise(64, 64, "JPEG"))),
        ("flux-1-fill-pro", "fal", "image", cut_short(noise(64, 64, "PNG", "RGBA"))),
        ("flux-1-fill-pro", "fal", "mask", cut_short(noise(64, 64, "PNG", "RGBA"))),
        ("gpt-image-1.5", "openai", "image", cut_short(noise(64, 64, "JPEG"))),
        ("gpt-image-1.5", "openai", "mask", cut_short(noise(64, 64, "PNG", "RGBA"))),
    ],
)
def test_a_truncated_upload_is_a_400_naming_it_on_every_edit_model(
    settings: Settings, model: str, provider: str, field: str, data: bytes
) -> None:
    """A PNG or JPEG cut short opens (its header is whole), but is refused before any upstream is called,
    whether a route would decode it (Fill) or send it on as it is; for test keys too."""
    with running_stack(settings, providers=(provider,)) as stack:
        for sdk in (stack.live, stack.test):
            request: dict[str, Any] = {"image": ("a.png", noise(64, 64, "PNG", "RGBA"))} | {field: ("cut", data)}
            with pytest.raises(openai.BadRequestError) as caught:
                sdk.images.edit(model=model, prompt="sky", **request)
            assert caught.value.param == field and "'cut' is cut short or damaged" in caught.value.message
        assert (stack.bfl.submissions, stack.fal.submissions, stack.openai.edits) == ([], [], [])


def test_an_image_whose_pixels_cannot_be_decoded_is_a_400_naming_it(settings: Settings) -> None:
    """A PNG whose chunks are whole but whose pixel data is not a zlib stream: it is found out only where
    it is decoded (for the Fill mask, for a test key's picture), and named there."""
    data = half_transparent(64, 64)
    start = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[start : start + 4])
    damaged = data[:start] + chunk(b"IDAT", b"\x00" * length) + data[start + 12 + length :]
    with running_stack(settings, providers=("bfl",)) as stack:
        for sdk, model in ((stack.live, "flux-1-fill-pro"), (stack.test, "flux-kontext-pro")):
            with pytest.raises(openai.BadRequestError) as caught:
                sdk.images.edit(model=model, image=("bad.png", damaged), prompt="sky")
            assert caught.value.param == "image" and "'bad.png' cannot be decoded" in caught.value.message
        assert stack.bfl.submissions == []
