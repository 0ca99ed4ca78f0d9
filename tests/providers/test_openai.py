import asyncio
import base64
import dataclasses
import io
import tempfile
from collections.abc import AsyncIterator, Iterator
from datetime import date
from typing import Any

import openai as openai_sdk
import pytest
from PIL import Image

from qubax.errors import ContentPolicyViolation, TaskFailed, UpstreamError
from qubax.pipeline.uploads import InputImage
from qubax.providers import Upstream
from qubax.providers.openai import OpenAI, relay
from qubax.providers.transport import Http, open_session
from qubax.routing.request import PartialImage
from tests.fakes.openai import SAFETY_MESSAGE, FakeOpenAI
from tests.providers import Job, ask
from tests.server import serve


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI()


@pytest.fixture
def server(fake: FakeOpenAI) -> Iterator[str]:
    with serve(fake.app) as url:
        yield url


@pytest.fixture
async def http() -> AsyncIterator[Http]:
    async with open_session() as client:
        yield client


@pytest.fixture
def openai(http: Http, server: str) -> OpenAI:
    return OpenAI(Upstream(http, f"{server}/v1", "test-key", poll_interval=0.01))


def job(n: int = 1, quality: str | None = "hd", style: str | None = "natural", size: str = "1792x1024") -> Job:
    width, height = (int(side) for side in size.split("x"))
    return Job("dall-e-3", "a lighthouse at dusk", width, height, n, quality=quality, style=style)


def picture(data: bytes) -> tuple[str | None, tuple[int, int], tuple[int, int, int]]:
    image = Image.open(io.BytesIO(data))
    return image.format, image.size, image.convert("RGB").getpixel((0, 0))  # type: ignore[return-value]


@pytest.mark.anyio
async def test_one_image(openai: OpenAI, fake: FakeOpenAI) -> None:
    [image] = await ask(openai, job())

    assert fake.requests == [
        {
            "model": "dall-e-3",
            "prompt": "a lighthouse at dusk",
            "n": 1,
            "size": "1792x1024",
            "response_format": "b64_json",
            "quality": "hd",
            "style": "natural",
        }
    ]
    assert picture(image.data)[:2] == ("PNG", (1792, 1024))
    assert image.revised_prompt == "A natural picture of a lighthouse at dusk"


@pytest.mark.anyio
async def test_an_inline_image_keeps_the_upstreams_base64_text(openai: OpenAI, fake: FakeOpenAI) -> None:
    [image] = await ask(openai, job())
    assert image.b64 is not None and base64.b64decode(image.b64) == image.data


@pytest.mark.anyio
async def test_unset_quality_and_style_are_not_sent(openai: OpenAI, fake: FakeOpenAI) -> None:
    await ask(openai, job(quality=None, style=None, size="1024x1024"))

    assert fake.requests == [
        {
            "model": "dall-e-3",
            "prompt": "a lighthouse at dusk",
            "n": 1,
            "size": "1024x1024",
            "response_format": "b64_json",
        }
    ]


@pytest.mark.anyio
async def test_n_images_are_n_concurrent_calls(openai: OpenAI, fake: FakeOpenAI) -> None:
    fake.delay = 0.3

    images = await ask(openai, job(n=3, size="1024x1792"))

    assert [request["n"] for request in fake.requests] == [1, 1, 1]
    assert fake.peak == 3
    assert [picture(image.data)[1] for image in images] == [(1024, 1792)] * 3
    assert len({picture(image.data)[2] for image in images}) == 3
    assert {image.revised_prompt for image in images} == {"A natural picture of a lighthouse at dusk"}


@pytest.mark.anyio
async def test_url_results_are_downloaded(openai: OpenAI, fake: FakeOpenAI) -> None:
    fake.return_urls = True

    images = await ask(openai, job(n=2))

    assert sorted(fake.downloads) == ["/files/img-0", "/files/img-1"]
    assert sorted(image.data for image in images) == sorted(fake.files.values())
    assert images[0].revised_prompt == "A natural picture of a lighthouse at dusk"


@pytest.mark.anyio
async def test_jpeg_is_passed_through_as_is(openai: OpenAI, fake: FakeOpenAI) -> None:
    fake.image_format = "JPEG"

    [image] = await ask(openai, job())

    assert image.data[:3] == b"\xff\xd8\xff"
    assert picture(image.data)[:2] == ("JPEG", (1792, 1024))


@pytest.mark.anyio
@pytest.mark.parametrize("code", ["content_policy_violation", "moderation_blocked"])
async def test_safety_refusal_is_a_content_policy_violation(openai: OpenAI, fake: FakeOpenAI, code: str) -> None:
    fake.moderate = code

    with pytest.raises(ContentPolicyViolation) as caught:
        await ask(openai, job())

    assert (caught.value.code, caught.value.message) == ("content_policy_violation", SAFETY_MESSAGE)


@pytest.mark.anyio
async def test_retired_model_says_where_to_point_the_base_url(openai: OpenAI, fake: FakeOpenAI) -> None:
    fake.retired = True

    with pytest.raises(UpstreamError) as caught:
        await ask(openai, job())

    assert caught.value.retryable is False
    assert caught.value.message == "The upstream for this model does not serve dall-e-3."
    assert caught.value.detail == (
        "the configured OpenAI-compatible host (127.0.0.1) does not serve it; "
        "point QUBAX_OPENAI_BASE_URL at a host that does. "
        "It said: The model `dall-e-3` does not exist or you do not have access to it."
    )


@pytest.mark.anyio
async def test_plain_404_from_a_wrong_base_url_gets_the_same_advice(http: Http, server: str) -> None:
    openai = OpenAI(Upstream(http, server, "test-key"))  # missing /v1: Starlette's plain-text 404

    with pytest.raises(UpstreamError) as caught:
        await ask(openai, job())

    assert "point QUBAX_OPENAI_BASE_URL at a host that does" in caught.value.detail
    assert caught.value.retryable is False


@pytest.mark.anyio
async def test_insufficient_quota_is_not_retryable(openai: OpenAI, fake: FakeOpenAI) -> None:
    fake.out_of_credit = True

    with pytest.raises(UpstreamError) as caught:
        await ask(openai, job())

    assert caught.value.retryable is False
    assert caught.value.message == "OpenAI could not serve the request (429)."
    assert caught.value.detail.startswith("the account is out of credit: You exceeded your current quota")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "retryable", "message", "detail"),
    [
        (402, False, "OpenAI could not serve the request (402).", "the account is out of credit: fake failure 402"),
        (429, True, "OpenAI is over its rate limit (429).", "rate limited: fake failure 429"),
        (500, True, "OpenAI failed (500).", "fake failure 500"),
        (503, True, "OpenAI failed (503).", "fake failure 503"),
    ],
)
async def test_status_mapping(
    openai: OpenAI, fake: FakeOpenAI, status: int, retryable: bool, message: str, detail: str
) -> None:
    fake.fail_status = status

    with pytest.raises(UpstreamError) as caught:
        await ask(openai, job())

    assert type(caught.value) is UpstreamError
    assert (caught.value.message, caught.value.detail, caught.value.retryable) == (message, detail, retryable)


@pytest.mark.anyio
async def test_wrong_key_is_not_retryable(http: Http, server: str) -> None:
    openai = OpenAI(Upstream(http, f"{server}/v1", "wrong-key"))

    with pytest.raises(UpstreamError) as caught:
        await ask(openai, job())

    assert caught.value.message == "OpenAI could not serve the request (401)."
    assert caught.value.detail == "the configured credential was rejected: Incorrect API key provided: test-***."
    assert caught.value.retryable is False


@pytest.mark.anyio
async def test_upstream_validation_message_is_kept_for_the_operator(openai: OpenAI, fake: FakeOpenAI) -> None:
    with pytest.raises(UpstreamError) as caught:
        await ask(openai, job(size="1024x768"))

    assert caught.value.message == "OpenAI refused the request (400)."
    assert caught.value.detail == "The size is not supported by this model."
    assert caught.value.retryable is False


@pytest.mark.anyio
async def test_html_body_is_an_upstream_error(openai: OpenAI, fake: FakeOpenAI) -> None:
    fake.garbage = True

    with pytest.raises(UpstreamError, match="unreadable response"):
        await ask(openai, job())


@pytest.mark.anyio
async def test_html_error_page_from_a_proxy_is_retryable(openai: OpenAI, fake: FakeOpenAI) -> None:
    fake.garbage, fake.fail_status = True, 502

    with pytest.raises(UpstreamError) as caught:
        await ask(openai, job())

    assert (caught.value.message, caught.value.retryable) == ("OpenAI failed (502).", True)


@pytest.mark.anyio
async def test_invalid_base64_is_an_upstream_error(openai: OpenAI, fake: FakeOpenAI) -> None:
    fake.bad_base64 = True

    with pytest.raises(UpstreamError, match="not valid base64"):
        await ask(openai, job())


@pytest.mark.anyio
async def test_no_image_in_the_answer_is_an_error(openai: OpenAI, fake: FakeOpenAI) -> None:
    fake.empty = True

    with pytest.raises(UpstreamError) as caught:
        await ask(openai, job(n=2))

    assert caught.value.message == "OpenAI returned no image."


@pytest.mark.anyio
async def test_url_on_a_foreign_host_is_never_fetched(openai: OpenAI, fake: FakeOpenAI) -> None:
    # `localhost` reaches the same fake, so a fetch would show up in fake.downloads.
    fake.return_urls, fake.url_host = True, "localhost"

    with pytest.raises(UpstreamError, match="host we do not download from"):
        await ask(openai, job())

    assert fake.downloads == []


# --- GPT image models ------------------------------------------------------------------------------------


def gpt(n: int = 2, size: str = "1536x1024", **options: Any) -> Job:
    width, height = (int(side) for side in size.split("x"))
    return Job("gpt-image-1.5", "a red barn at dawn", width, height, n, **options)


@pytest.mark.anyio
async def test_a_gpt_image_model_gets_all_n_in_one_call_with_its_parameters(openai: OpenAI, fake: FakeOpenAI) -> None:
    job = gpt(quality="high", output_format="webp", background="transparent", moderation="low", output_compression=80)
    images = await ask(openai, job)

    assert fake.requests == [
        {
            "model": "gpt-image-1.5",
            "prompt": "a red barn at dawn",
            "n": 2,
            "size": "1536x1024",
            "output_format": "webp",
            "quality": "high",
            "background": "transparent",
            "moderation": "low",
            "output_compression": 80,
        }
    ]  # no response_format: OpenAI refuses it for these models
    assert [picture(image.data)[:2] for image in images] == [("WEBP", (1536, 1024))] * 2
    first, second = images
    assert first.tokens is not None and first.tokens.model == "gpt-image-1.5"
    assert first.tokens.usage.output_tokens == 2 * 6240
    assert first.tokens.usage.input_tokens_details.text_tokens == 5
    assert second.tokens is None  # one count for the call, on its first image
    assert first.settings == second.settings == {"quality": "high", "background": "transparent"}


@pytest.mark.anyio
async def test_what_a_gpt_image_model_resolves_from_auto_is_kept(openai: OpenAI, fake: FakeOpenAI) -> None:
    [image] = await ask(openai, gpt(n=1, size="1024x1024", quality="auto"))

    assert image.settings == {"quality": "medium", "background": "opaque"}
    assert image.tokens is not None and image.tokens.usage.output_tokens == 1056


@pytest.mark.anyio
async def test_a_gpt_image_answer_short_of_images_keeps_what_it_made(openai: OpenAI, fake: FakeOpenAI) -> None:
    fake.empty = True

    with pytest.raises(TaskFailed, match="returned no image"):
        await ask(openai, gpt())


def test_the_fake_answers_gpt_image_models_as_the_official_sdk_expects(server: str) -> None:
    """The official client, validating strictly, against the fake: the fake cannot drift from the protocol."""
    client = openai_sdk.OpenAI(
        api_key="test-key", base_url=f"{server}/v1", max_retries=0, _strict_response_validation=True
    )
    response = client.images.generate(model="gpt-image-2", prompt="a fox", size="2048x1152", quality="low", n=2)
    assert len(response.data) == 2 and response.data[0].b64_json
    assert (response.size, response.quality, response.background, response.output_format) == (
        "2048x1152",
        "low",
        "opaque",
        "png",
    )
    assert response.usage is not None and response.usage.input_tokens_details.text_tokens == 2
    with pytest.raises(openai_sdk.BadRequestError) as refused:
        client.images.generate(model="gpt-image-1.5", prompt="a fox", response_format="url")
    assert refused.value.code == "unknown_parameter"
    with pytest.raises(openai_sdk.BadRequestError) as refused:
        client.images.generate(model="gpt-image-1.5", prompt="a fox", size="2048x1152")
    assert refused.value.code == "invalid_size"


# --- edits ---------------------------------------------------------------------------------------------------


def upload(width: int, height: int, kind: str = "PNG", name: str = "a.png") -> InputImage:
    """An uploaded image as the app keeps it: an open temporary file."""
    file = tempfile.TemporaryFile()  # noqa: SIM115 (open for the test's life, as the app keeps an upload)
    Image.new("RGBA" if kind == "PNG" else "RGB", (width, height)).save(file, kind)
    return InputImage(file, name, kind.lower(), width, height)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_an_edit_sends_its_images_and_mask_as_multipart(openai: OpenAI, fake: FakeOpenAI) -> None:
    images = (upload(64, 64), upload(32, 48, "JPEG", "b.jpg"))
    job = dataclasses.replace(gpt(n=1, size="1024x1024").request(), images=images, mask=upload(64, 64, name="m.png"))
    job = dataclasses.replace(job, input_fidelity="high")

    [image] = await openai.generate(job, "gpt-image-1.5")
    # The same uploads again, as a second route would send them: read from their start, still open.
    await openai.generate(job, "gpt-image-1.5")

    first, again = fake.edits
    assert first["images"] == [("a.png", "PNG", (64, 64)), ("b.jpg", "JPEG", (32, 48))]
    assert first["mask"] == ("m.png", "PNG", (64, 64))
    assert first["fields"] == {
        "model": "gpt-image-1.5",
        "prompt": "a red barn at dawn",
        "n": "1",
        "size": "1024x1024",
        "output_format": "png",
        "input_fidelity": "high",
    }
    assert again == first
    assert picture(image.data)[:2] == ("PNG", (1024, 1024))
    assert image.tokens is not None and image.tokens.model == "gpt-image-1.5"


def test_the_fake_streams_as_the_official_sdk_reads_streams(server: str, fake: FakeOpenAI) -> None:
    client = openai_sdk.OpenAI(api_key="test-key", base_url=f"{server}/v1", max_retries=0)
    events = list(client.images.generate(model="gpt-image-1.5", prompt="a fox", stream=True, partial_images=2))
    assert [event.type for event in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert events[-1].usage.output_tokens > 0 and events[1].partial_image_index == 1
    image = io.BytesIO()
    Image.new("RGB", (32, 32)).save(image, "PNG")
    edited = client.images.edit(
        model="gpt-image-1.5", image=("a.png", image.getvalue()), prompt="blue", stream=True, partial_images=1
    )
    assert [event.type for event in edited] == ["image_edit.partial_image", "image_edit.completed"]
    fake.stream_error_after = 0
    with pytest.raises(openai_sdk.APIError, match="could not be finished"):
        list(client.images.generate(model="gpt-image-1.5", prompt="a fox", stream=True, partial_images=1))


@pytest.mark.anyio
async def test_a_streamed_call_relays_partial_images(openai: OpenAI, fake: FakeOpenAI) -> None:
    received: asyncio.Queue[PartialImage] = asyncio.Queue()
    request = dataclasses.replace(gpt(n=1).request(), partial_images=3, index=1, partials=received)
    [image] = await openai.generate(request, "gpt-image-1.5")
    partials = [received.get_nowait() for _ in range(received.qsize())]
    assert [(partial.image, partial.partial_image_index) for partial in partials] == [(1, 0), (1, 1), (1, 2)]
    assert all(partial.b64_json for partial in partials)
    assert image.tokens is not None and image.tokens.usage.output_tokens > 0
    assert fake.requests[-1]["stream"] is True


def test_a_partial_image_that_is_not_base64_is_left_out() -> None:
    """It would be written into our events as it came (bytes cut from the upstream's JSON): only base64 is."""
    received: asyncio.Queue[PartialImage] = asyncio.Queue()
    request = dataclasses.replace(gpt(n=1).request(), partial_images=2, partials=received)
    on_event = relay(request)
    good = base64.b64encode(b"\x89PNG partial")
    for index, text in enumerate([b'not "base64"\n' * 8, good, "", None]):
        on_event({"type": "image_generation.partial_image", "partial_image_index": index, "b64_json": text})
    assert [(partial.partial_image_index, partial.b64_json) for partial in [received.get_nowait()]] == [(1, good)]
    assert received.empty()


# --- lifecycles ----------------------------------------------------------------------------------------------


def test_the_fakes_model_list_carries_shutdown_dates_as_the_official_sdk_reads_them(server: str) -> None:
    client = openai_sdk.OpenAI(
        api_key="test-key", base_url=f"{server}/v1", max_retries=0, _strict_response_validation=True
    )
    listed = {model.id: model.shutdown_date for model in client.models.list()}
    assert listed["gpt-image-1"] == "2026-10-23" and listed["gpt-image-1.5"] == "2026-12-01"
    assert listed["gpt-image-2"] is None  # none announced


@pytest.mark.anyio
async def test_the_shutdown_dates_openai_publishes(openai: OpenAI, fake: FakeOpenAI) -> None:
    fake.shutdown_dates |= {"gpt-image-2": "not a date", "gpt-image-2.6-flare": "2099-01-31"}
    dates = await openai.shutdown_dates()
    assert dates["dall-e-3"] == date(2026, 5, 12) and dates["gpt-image-1-mini"] == date(2026, 12, 1)
    assert dates["gpt-image-2.6-flare"] == date(2099, 1, 31)
    assert "gpt-image-2" not in dates and "gpt-image-2.6-sunburst" not in dates  # unreadable, and none
    fake.fail_status = 503
    with pytest.raises(UpstreamError):
        await openai.shutdown_dates()
