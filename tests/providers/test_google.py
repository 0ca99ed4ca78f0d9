import base64
import dataclasses
import io
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from PIL import Image

from qubax.errors import MODEL_NOT_SERVED, ContentPolicyViolation, UpstreamError
from qubax.pipeline.uploads import InputImage
from qubax.providers import Upstream
from qubax.providers.google import Google, body
from qubax.providers.registry import PROVIDERS
from qubax.providers.transport import Http, open_session
from qubax.routing.catalog import Catalog
from tests.catalog import MODELS
from tests.fakes.google import FakeGoogle, inline_image
from tests.providers import Job, ask
from tests.server import serve

FLASH, PRO, NANO = "gemini-3.1-flash-image", "gemini-3-pro-image", "gemini-2.5-flash-image"


@pytest.fixture
def fake() -> FakeGoogle:
    return FakeGoogle()


@pytest.fixture
def root(fake: FakeGoogle) -> Iterator[str]:
    with serve(fake.app) as url:
        yield url


@pytest.fixture
async def http() -> AsyncIterator[Http]:
    async with open_session() as client:
        yield client


@pytest.fixture
def google(http: Http, root: str) -> Google:
    return Google(Upstream(http, f"{root}/v1beta", "test-key"))


@pytest.fixture
def client(root: str) -> Iterator[genai.Client]:
    with sdk(root) as opened:
        yield opened


def sdk(root: str, key: str = "test-key") -> genai.Client:
    """Google's own client, on the fake, at the API version our adapter uses (hold on to it: it closes its
    connections when collected)."""
    return genai.Client(api_key=key, http_options=types.HttpOptions(base_url=root, api_version="v1beta"))


def job(model: str = FLASH, width: int = 1024, height: int = 1024, n: int = 1) -> Job:
    return Job(model=model, prompt="a red fox in snow", width=width, height=height, n=n)


def upload(width: int, height: int, color: tuple[int, int, int] = (0, 0, 0)) -> InputImage:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    out.seek(0)
    return InputImage(out, "a.png", "png", width, height)


def size_of(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


# The fake against Google's client: the protocol our adapter speaks is the one google-genai speaks.


def test_sdk_generation_matches_our_request(client: genai.Client, fake: FakeGoogle) -> None:
    config = types.GenerateContentConfig(
        response_modalities=["IMAGE"], image_config=types.ImageConfig(aspect_ratio="16:9", image_size="2K")
    )
    answer = client.models.generate_content(model=PRO, contents="a red fox in snow", config=config)

    assert answer.candidates and answer.candidates[0].finish_reason == types.FinishReason.STOP
    part = answer.candidates[0].content.parts[0]  # type: ignore[union-attr,index]
    assert part.inline_data and part.inline_data.mime_type == "image/png"
    assert size_of(part.inline_data.data or b"") == (2736, 1536)
    usage = answer.usage_metadata
    assert usage and usage.candidates_token_count == 1120 and usage.thoughts_token_count == 200
    assert usage.candidates_tokens_details == [
        types.ModalityTokenCount(modality=types.MediaModality.IMAGE, token_count=1120)
    ]
    assert fake.headers[0]["x-goog-api-key"] == "test-key"
    # What our adapter sends for a 1920x1080 request is what Google's client sent.
    assert body(job(PRO, 1920, 1080).request(), PRO, ()) == fake.requests[0][1]


def test_sdk_edit_with_two_images_matches_our_request(client: genai.Client, fake: FakeGoogle) -> None:
    first, second = upload(64, 64, (255, 0, 0)), upload(48, 32, (0, 0, 255))
    parts = [types.Part.from_text(text="a red fox in snow")]
    parts += [types.Part.from_bytes(data=image.read(), mime_type="image/png") for image in (first, second)]
    config = types.GenerateContentConfig(
        response_modalities=["IMAGE"], image_config=types.ImageConfig(aspect_ratio="1:1", image_size="1K")
    )
    client.models.generate_content(model=FLASH, contents=types.Content(role="user", parts=parts), config=config)

    sent = fake.requests[0][1]
    ours = body(job(FLASH).request(), FLASH, (("image/png", b64(first)), ("image/png", b64(second))))
    assert ours["generationConfig"] == sent["generationConfig"]
    # The same parts: Google's client writes `mime_type` and URL-safe base64, both valid proto3 JSON.
    theirs, mine = sent["contents"][0]["parts"], ours["contents"][0]["parts"]
    assert theirs[0] == mine[0] == {"text": "a red fox in snow"}
    assert (
        [seen(part) for part in theirs[1:]]
        == [seen(part) for part in mine[1:]]
        == [
            ("image/png", (64, 64), (255, 0, 0)),
            ("image/png", (48, 32), (0, 0, 255)),
        ]
    )


def test_sdk_thinking_level_matches_ours(client: genai.Client, fake: FakeGoogle) -> None:
    thinking = types.ThinkingConfig(thinking_level=types.ThinkingLevel.MINIMAL)
    config = types.GenerateContentConfig(
        response_modalities=["IMAGE"],
        image_config=types.ImageConfig(aspect_ratio="1:1", image_size="1K"),
        thinking_config=thinking,
    )
    client.models.generate_content(model=FLASH, contents="a red fox in snow", config=config)

    fast = dataclasses.replace(job(FLASH).request(), model=Catalog(MODELS).find("imagen-4-fast"))
    assert body(fast, FLASH, ()) == camel(fake.requests[0][1])  # the client writes `thinking_level`
    assert "thinkingConfig" not in body(job(FLASH).request(), FLASH, ())["generationConfig"]


def test_sdk_reads_the_fakes_refusals(client: genai.Client, fake: FakeGoogle) -> None:
    fake.block_reason = "PROHIBITED_CONTENT"
    answer = client.models.generate_content(model=FLASH, contents="something forbidden")
    assert answer.prompt_feedback and answer.prompt_feedback.block_reason == types.BlockedReason.PROHIBITED_CONTENT
    assert not answer.candidates

    fake.block_reason, fake.finish_reason = None, "IMAGE_SAFETY"
    config = types.GenerateContentConfig(response_modalities=["IMAGE"])
    answer = client.models.generate_content(model=FLASH, contents="x", config=config)
    assert answer.candidates and answer.candidates[0].finish_reason == types.FinishReason.IMAGE_SAFETY
    assert answer.candidates[0].content is None


def test_sdk_reads_the_fakes_errors(client: genai.Client, root: str, fake: FakeGoogle) -> None:
    with sdk(root, key="wrong") as wrong, pytest.raises(genai_errors.ClientError) as bad_key:
        wrong.models.generate_content(model=FLASH, contents="x")
    assert bad_key.value.code == 400 and bad_key.value.status == "INVALID_ARGUMENT"
    with pytest.raises(genai_errors.ClientError) as unknown:
        client.models.generate_content(model="imagen-4.0-generate-001", contents="x")
    assert unknown.value.code == 404 and unknown.value.status == "NOT_FOUND"
    fake.fail_status = 429
    with pytest.raises(genai_errors.ClientError) as limited:
        client.models.generate_content(model=FLASH, contents="x")
    assert limited.value.status == "RESOURCE_EXHAUSTED"


# The adapter.


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("model", "width", "height", "config"),
    [
        (FLASH, 1024, 1024, {"aspectRatio": "1:1", "imageSize": "1K"}),
        (FLASH, 1536, 1024, {"aspectRatio": "3:2", "imageSize": "2K"}),
        (PRO, 1080, 1920, {"aspectRatio": "9:16", "imageSize": "2K"}),
        (PRO, 4096, 2304, {"aspectRatio": "16:9", "imageSize": "4K"}),
        (PRO, 2048, 880, {"aspectRatio": "21:9", "imageSize": "2K"}),
        (NANO, 1200, 900, {"aspectRatio": "4:3"}),  # 1K only: no imageSize
    ],
)
async def test_aspect_ratio_and_image_size_from_the_size(
    google: Google, fake: FakeGoogle, model: str, width: int, height: int, config: dict[str, str]
) -> None:
    [image] = await ask(google, job(model, width, height))

    sent_model, sent = fake.requests[0]
    assert sent_model == model
    assert sent["generationConfig"] == {"responseModalities": ["IMAGE"], "imageConfig": config}
    assert sent["contents"] == [{"role": "user", "parts": [{"text": "a red fox in snow"}]}]
    assert image.data.startswith(b"\x89PNG")


@pytest.mark.anyio
async def test_n_images_by_as_many_calls_each_with_its_tokens(google: Google, fake: FakeGoogle) -> None:
    images = await ask(google, job(PRO, n=3))

    assert len(fake.requests) == 3
    assert len({image.data for image in images}) == 3
    assert all(image.tokens is not None and image.tokens.model == PRO for image in images)


@pytest.mark.anyio
async def test_usage_in_openais_shape(google: Google) -> None:
    [image] = await google.generate(dataclasses.replace(job(PRO).request(), images=(upload(64, 64),)), PRO)

    assert image.tokens is not None
    usage = image.tokens.usage.model_dump()
    text = len("a red fox in snow") // 4 + 1
    assert usage == {
        "input_tokens": text + 258,
        "output_tokens": 1120 + 200,  # the image, and the thinking before it
        "total_tokens": text + 258 + 1320,
        "input_tokens_details": {"text_tokens": text, "image_tokens": 258},
        "output_tokens_details": {"image_tokens": 1120, "text_tokens": 200},
    }


@pytest.mark.anyio
async def test_edit_sends_each_image_inline_in_order(google: Google, fake: FakeGoogle) -> None:
    images = (upload(64, 64, (255, 0, 0)), upload(32, 48, (0, 255, 0)), upload(16, 16, (0, 0, 255)))
    await google.generate(dataclasses.replace(job(FLASH).request(), images=images), FLASH)

    parts = fake.requests[0][1]["contents"][0]["parts"]
    assert parts[0] == {"text": "a red fox in snow"}
    assert [part["inlineData"]["mimeType"] for part in parts[1:]] == ["image/png"] * 3
    sent = [Image.open(io.BytesIO(base64.b64decode(part["inlineData"]["data"]))) for part in parts[1:]]
    assert [(image.size, image.getpixel((0, 0))) for image in sent] == [
        ((64, 64), (255, 0, 0)),
        ((32, 48), (0, 255, 0)),
        ((16, 16), (0, 0, 255)),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "refusal",
    [
        {"block_reason": "SAFETY"},
        {"block_reason": "PROHIBITED_CONTENT"},
        {"finish_reason": "IMAGE_SAFETY"},
        {"finish_reason": "PROHIBITED_CONTENT"},
        {"finish_reason": "NO_IMAGE"},
        {"text_only": True},
    ],
)
async def test_safety_refusals_are_content_policy_violations(
    google: Google, fake: FakeGoogle, refusal: dict[str, object]
) -> None:
    for name, value in refusal.items():
        setattr(fake, name, value)
    with pytest.raises(ContentPolicyViolation):
        await ask(google, job())


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "retryable", "failover"),
    [(400, False, False), (403, False, True), (429, True, True), (500, True, True), (503, True, True)],
)
async def test_http_errors(google: Google, fake: FakeGoogle, status: int, retryable: bool, failover: bool) -> None:
    fake.fail_status = status
    with pytest.raises(UpstreamError) as failure:
        await ask(google, job())
    assert (failure.value.retryable, failure.value.failover) == (retryable, failover)
    assert f"fake failure {status}" in failure.value.detail
    assert failure.value.code != MODEL_NOT_SERVED


@pytest.mark.anyio
async def test_a_rejected_key_may_fail_over(http: Http, root: str) -> None:
    google = Google(Upstream(http, f"{root}/v1beta", "wrong-key"))
    with pytest.raises(UpstreamError) as failure:
        await ask(google, job())
    assert failure.value.failover and not failure.value.retryable
    assert "credential was rejected" in failure.value.detail


@pytest.mark.anyio
async def test_an_unknown_model_is_not_served(google: Google) -> None:
    with pytest.raises(UpstreamError) as failure:
        await ask(google, job("gemini-9-image"))
    assert failure.value.code == MODEL_NOT_SERVED and failure.value.failover


@pytest.mark.anyio
async def test_imagen_is_not_served_and_costs_no_call(google: Google, fake: FakeGoogle) -> None:
    with pytest.raises(UpstreamError) as failure:
        await ask(google, job("imagen-4.0-generate-001"))
    assert failure.value.code == MODEL_NOT_SERVED and failure.value.failover
    assert fake.requests == []


@pytest.mark.anyio
async def test_the_key_goes_in_its_header(google: Google, fake: FakeGoogle) -> None:
    await ask(google, job())
    assert fake.headers[0]["x-goog-api-key"] == "test-key"
    assert "authorization" not in fake.headers[0]


def seen(part: dict[str, Any]) -> tuple[str, tuple[int, int], Any] | None:
    """What the fake makes of an inline image part: its MIME type, size and first pixel."""
    found = inline_image(part["inlineData"])
    return None if found is None else (found[0], found[1].size, found[1].convert("RGB").getpixel((0, 0)))


def camel(found: Any) -> Any:
    """A JSON body with its field names in proto3 JSON's camelCase (the API takes either spelling)."""
    if isinstance(found, dict):
        return {re.sub(r"_([a-z])", lambda m: m[1].upper(), k): camel(v) for k, v in found.items()}
    return [camel(v) for v in found] if isinstance(found, list) else found


def b64(image: InputImage) -> str:
    return base64.b64encode(image.read()).decode()


def test_the_providers_variables_and_default_base_url() -> None:
    info = PROVIDERS["google"]
    assert (info.credential, info.base_url_variable) == ("GEMINI_API_KEY", "QUBAX_GOOGLE_BASE_URL")
    assert info.base_url == "https://generativelanguage.googleapis.com/v1beta"
