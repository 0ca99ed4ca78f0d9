"""End to end through the official `openai` SDK against the real app, with test keys."""

import base64
import dataclasses
import gc
import hashlib
import io
import random
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from qubax.pipeline import generation
from qubax.pipeline.converter import Converter
from qubax.providers import GeneratedImage
from qubax.records.ledger import GenerationRecord, Ledger
from qubax.records.s3 import S3Storage
from qubax.records.storage import LocalStorage
from qubax.server.settings import Settings
from tests.catalog import MODELS
from tests.providers import Job
from tests.stack import running_stack

NAMES = [name for model in MODELS for name in (model.id, *model.aliases)]  # as /v1/models lists them


def png_size(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.size


@pytest.fixture
def client(base_url: str, test_key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=test_key, base_url=base_url + "/v1", max_retries=0)


def test_spec_example_returns_a_fetchable_png_url(client: openai.OpenAI) -> None:
    response = client.images.generate(
        model="flux-1.1-pro", prompt="a cat in space, photorealistic", n=1, size="1024x1024"
    )
    assert isinstance(response.created, int)
    assert len(response.data) == 1
    url = response.data[0].url
    assert url is not None and "/images/img_" in url and "signature=" in url.lower()  # S3's is X-Amz-Signature
    download = httpx.get(url)
    assert download.status_code == 200
    assert download.headers["content-type"] == "image/png"
    assert png_size(download.content) == (1024, 1024)


@pytest.mark.parametrize("model", [m.id for m in MODELS if m.generates])
def test_every_model_answers_test_keys_at_its_default_size(client: openai.OpenAI, model: str) -> None:
    raw = client.images.with_raw_response.generate(model=model, prompt="a lighthouse", response_format="b64_json")
    assert raw.headers["x-qubax-test"] == "true"
    assert raw.headers["x-request-id"].startswith("req_")
    response = raw.parse()
    default = next(m.default_size for m in MODELS if m.id == model)
    width, height = (int(side) for side in default.split("x"))
    b64 = response.data[0].b64_json
    assert b64 is not None
    assert png_size(base64.b64decode(b64)) == (width, height)


def test_n_images_are_distinct(client: openai.OpenAI) -> None:
    response = client.images.generate(
        model="flux-1-schnell", prompt="a fox", n=4, size="512x256", response_format="b64_json"
    )
    payloads = [base64.b64decode(item.b64_json or "") for item in response.data]
    assert len(payloads) == 4
    assert len(set(payloads)) == 4
    assert all(png_size(p) == (512, 256) for p in payloads)


def test_test_key_output_is_deterministic(client: openai.OpenAI) -> None:
    def once() -> str | None:
        return client.images.generate(model="flux-1.1-pro", prompt="same", response_format="b64_json").data[0].b64_json

    assert once() == once()


def test_explicit_nulls_mean_defaults(client: openai.OpenAI) -> None:
    response = client.images.generate(
        model="flux-1.1-pro", prompt="p", n=None, size=None, response_format=None, quality=None, style=None
    )
    url = response.data[0].url
    assert url is not None
    assert png_size(httpx.get(url).content) == (1024, 768)


def test_openai_client_fields_are_accepted(client: openai.OpenAI) -> None:
    response = client.images.generate(
        model="dall-e-3",
        prompt="p",
        quality="hd",
        style="natural",
        user="u-1",
        size="1792x1024",
        response_format="b64_json",
    )
    assert png_size(base64.b64decode(response.data[0].b64_json or "")) == (1792, 1024)


@pytest.mark.anyio
async def test_async_client(base_url: str, test_key: str) -> None:
    client = openai.AsyncOpenAI(api_key=test_key, base_url=base_url + "/v1", max_retries=0)
    response = await client.images.generate(
        model="flux-1.1-pro-ultra", prompt="mountains", n=2, size="1344x3136", response_format="b64_json"
    )
    assert [png_size(base64.b64decode(i.b64_json or "")) for i in response.data] == [(1344, 3136)] * 2
    models = [model.id async for model in client.models.list()]
    assert models == NAMES
    gpt = await client.images.generate(
        model="gpt-image-2", prompt="mountains", size="2048x1152", quality="low", output_format="webp"
    )
    assert (gpt.size, gpt.quality, gpt.output_format) == ("2048x1152", "low", "webp")
    with pytest.raises(openai.BadRequestError) as refused:
        await client.images.generate(
            model="gpt-image-2", prompt="mountains", background="transparent", output_format="jpeg"
        )
    assert refused.value.param == "background"
    await client.close()


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == NAMES
    model = client.models.retrieve("dall-e-3")
    assert (model.id, model.object, model.owned_by) == ("dall-e-3", "model", "openai")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("flux-9")
    assert caught.value.code == "model_not_found"


@pytest.mark.parametrize(("asked", "served"), [("flux-pro-1.1", "flux-1.1-pro"), ("dall-e3", "dall-e-3")])
def test_an_unknown_model_names_the_nearest_served_one(client: openai.OpenAI, asked: str, served: str) -> None:
    """BFL's own name for a model, or a near miss: still a 404, with the name to use."""
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(model=asked, prompt="a lighthouse")

    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    assert f"Did you mean `{served}`?" in str(caught.value)


def noise_png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.frombytes("RGB", (width, height), random.Random(width).randbytes(width * height * 3)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def converter() -> Iterator[Converter]:
    converting = Converter(1)
    yield converting
    converting.close()


@pytest.mark.anyio
@pytest.mark.parametrize("width", [64, 512])  # encoded on the loop, and past INLINE_BYTES (in a worker thread)
async def test_an_image_that_passes_through_is_answered_with_the_upstreams_own_base64(
    width: int, converter: Converter
) -> None:
    data = noise_png(width, 256)
    assert (len(data) > generation.INLINE_BYTES) == (width == 512)
    text = base64.b64encode(data).decode()
    request = dataclasses.replace(Job("m", "a cat", width, 256, 1).request(), response_format="b64_json")
    image = GeneratedImage(data, b64=text)
    assert await generation.inline(image, request, converter) is text  # not decoded and encoded again
    # Another size or format is converted, and encoded anew.
    smaller = await generation.inline(image, dataclasses.replace(request, height=128), converter)
    assert png_size(base64.b64decode(smaller)) == (width, 128)
    jpeg = await generation.inline(image, dataclasses.replace(request, output_format="jpeg"), converter)
    assert base64.b64decode(jpeg).startswith(b"\xff\xd8")


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
@pytest.mark.parametrize("delivered", ["inline", "url"])  # how the upstream hands its image over
def test_an_upstream_png_of_the_asked_size_reaches_the_client_byte_identical(
    settings: Settings, response_format: str, delivered: str
) -> None:
    sent = noise_png(1024, 1024)  # Pillow's encoder, not ours: anything we re-encoded would differ
    with running_stack(settings, providers=("openai",)) as stack:
        stack.openai.image = lambda *_: sent  # type: ignore[method-assign]
        stack.openai.return_urls = delivered == "url"
        answer = stack.live.images.generate(
            model="dall-e-3",
            prompt="a cat",
            size="1024x1024",
            response_format=response_format,  # type: ignore[arg-type]
        )
        image = answer.data[0]
        got = base64.b64decode(image.b64_json or "") if image.url is None else httpx.get(image.url).content
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(sent).hexdigest()


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
def test_no_copy_of_the_image_is_held_that_its_answer_does_not_need(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, response_format: str
) -> None:
    """Hundreds of requests can wait on their records at once: each keeps only what its answer carries
    (the base64 text, or a link), not also the image's bytes and the upstream's text; and an image
    being stored for a link is held as its bytes alone."""
    held: list[int] = []  # while the record is written: bytes and text
    stored: list[int] = []  # while a url-mode image is stored: text
    kind = S3Storage if (settings.storage_url or "").startswith("s3://") else LocalStorage  # --storage=s3
    record, put = Ledger.record, kind.put

    def alive() -> list[GeneratedImage]:
        gc.collect()  # another test's images in unreachable cycles are not held by anything
        return [found for found in gc.get_objects() if isinstance(found, GeneratedImage)]

    async def watched(self: Ledger, generation: GenerationRecord) -> None:
        held.append(sum(len(image.data) + len(image.b64 or "") for image in alive()))
        await record(self, generation)

    async def storing(self: Any, data: bytes, ext: str = "png", job_id: str | None = None) -> str:
        stored.append(sum(len(image.b64 or "") for image in alive()))
        return await put(self, data, ext, job_id)

    monkeypatch.setattr(Ledger, "record", watched)
    monkeypatch.setattr(kind, "put", storing)
    sent = noise_png(1024, 1024)
    with running_stack(settings, providers=("openai",)) as stack:
        stack.openai.image = lambda *_: sent  # type: ignore[method-assign]
        answer = stack.live.images.generate(
            model="dall-e-3",
            prompt="a cat",
            size="1024x1024",
            response_format=response_format,  # type: ignore[arg-type]
        )
    assert answer.data[0].b64_json or answer.data[0].url
    assert held == [0]
    assert stored == ([] if response_format == "b64_json" else [0])
