import base64
import io
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
import together as together_sdk
from PIL import Image

from qubax.errors import ContentPolicyViolation, UpstreamError
from qubax.providers import Upstream
from qubax.providers.together import Together
from qubax.providers.transport import Http, open_session
from tests.fakes.together import FakeTogether
from tests.providers import Job, ask
from tests.server import serve

SCHNELL = "black-forest-labs/FLUX.1-schnell"


@pytest.fixture
def fake() -> FakeTogether:
    return FakeTogether()


@pytest.fixture
def base_url(fake: FakeTogether) -> Iterator[str]:
    with serve(fake.app) as url:
        yield f"{url}/v1"


@pytest.fixture
async def http() -> AsyncIterator[Http]:
    async with open_session() as client:
        yield client


@pytest.fixture
def together(http: Http, base_url: str) -> Together:
    return Together(Upstream(http, base_url, "test-key", poll_interval=0.01))


def job(n: int = 1, model: str = SCHNELL, width: int = 512, height: int = 768) -> Job:
    return Job(model=model, prompt="a red fox in snow", width=width, height=height, n=n)


def picture(data: bytes) -> tuple[str | None, tuple[int, int], tuple[int, int, int]]:
    image = Image.open(io.BytesIO(data))
    return image.format, image.size, image.convert("RGB").getpixel((0, 0))  # type: ignore[return-value]


@pytest.mark.anyio
async def test_one_call_for_n_images(together: Together, fake: FakeTogether) -> None:
    images = await ask(together, job(n=3))

    assert fake.requests == [
        {
            "model": SCHNELL,
            "prompt": "a red fox in snow",
            "width": 512,
            "height": 768,
            "steps": 4,
            "n": 3,
            "response_format": "base64",
            "output_format": "png",
        }
    ]
    assert [picture(image.data)[:2] for image in images] == [("PNG", (512, 768))] * 3
    assert len({picture(image.data)[2] for image in images}) == 3  # three different images, none repeated
    assert [image.revised_prompt for image in images] == [None] * 3


@pytest.mark.anyio
async def test_steps_only_for_schnell(together: Together, fake: FakeTogether) -> None:
    await ask(together, job(model="black-forest-labs/FLUX.1.1-pro"))

    assert "steps" not in fake.requests[0]
    assert fake.requests[0]["model"] == "black-forest-labs/FLUX.1.1-pro"


@pytest.mark.anyio
async def test_more_than_four_split_into_concurrent_calls(together: Together, fake: FakeTogether) -> None:
    fake.delay = 0.3

    images = await ask(together, job(n=6))

    assert sorted(request["n"] for request in fake.requests) == [2, 4]
    assert fake.peak == 2
    assert len(images) == 6
    assert len({picture(image.data)[2] for image in images}) == 6


@pytest.mark.anyio
async def test_url_results_are_downloaded(together: Together, fake: FakeTogether) -> None:
    fake.return_urls = True

    images = await ask(together, job(n=2))

    assert sorted(fake.downloads) == ["/files/img-0", "/files/img-1"]
    assert sorted(image.data for image in images) == sorted(fake.files.values())
    assert picture(images[0].data)[:2] == ("PNG", (512, 768))


@pytest.mark.anyio
async def test_jpeg_is_passed_through_as_is(together: Together, fake: FakeTogether) -> None:
    fake.format_override = "JPEG"

    [image] = await ask(together, job())

    assert image.data[:3] == b"\xff\xd8\xff"
    assert picture(image.data)[:2] == ("JPEG", (512, 768))


@pytest.mark.anyio
async def test_safety_checker_is_a_content_policy_violation(together: Together, fake: FakeTogether) -> None:
    fake.moderate = True

    with pytest.raises(ContentPolicyViolation) as caught:
        await ask(together, job())

    assert caught.value.code == "content_policy_violation"
    assert caught.value.status_code == 400


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "retryable", "message", "detail"),
    [
        (402, False, "Together could not serve the request (402).", "the account is out of credit: fake failure 402"),
        (422, False, "Together refused the request (422).", "fake failure 422"),
        (429, True, "Together is over its rate limit (429).", "rate limited: fake failure 429"),
        (500, True, "Together failed (500).", "fake failure 500"),
        (503, True, "Together failed (503).", "fake failure 503"),
    ],
)
async def test_status_mapping(
    together: Together, fake: FakeTogether, status: int, retryable: bool, message: str, detail: str
) -> None:
    fake.fail_status = status

    with pytest.raises(UpstreamError) as caught:
        await ask(together, job())

    assert type(caught.value) is UpstreamError
    assert (caught.value.message, caught.value.detail, caught.value.retryable) == (message, detail, retryable)


@pytest.mark.anyio
async def test_wrong_key_is_not_retryable(http: Http, base_url: str) -> None:
    together = Together(Upstream(http, base_url, "wrong-key", poll_interval=0.01))

    with pytest.raises(UpstreamError) as caught:
        await ask(together, job())

    assert caught.value.message == "Together could not serve the request (401)."
    assert caught.value.detail == "the configured credential was rejected: Invalid API key provided."
    assert caught.value.retryable is False


@pytest.mark.anyio
async def test_html_body_is_an_upstream_error(together: Together, fake: FakeTogether) -> None:
    fake.garbage = True

    with pytest.raises(UpstreamError, match="unreadable response") as caught:
        await ask(together, job())

    assert caught.value.retryable is False


@pytest.mark.anyio
async def test_html_error_page_from_a_proxy_is_retryable(together: Together, fake: FakeTogether) -> None:
    fake.garbage, fake.fail_status = True, 502

    with pytest.raises(UpstreamError) as caught:
        await ask(together, job())

    assert (caught.value.message, caught.value.retryable) == ("Together failed (502).", True)


@pytest.mark.anyio
async def test_invalid_base64_is_an_upstream_error(together: Together, fake: FakeTogether) -> None:
    fake.bad_base64 = True

    with pytest.raises(UpstreamError, match="not valid base64"):
        await ask(together, job())


@pytest.mark.anyio
async def test_fewer_images_than_asked_is_an_error(together: Together, fake: FakeTogether) -> None:
    fake.drop = 1

    with pytest.raises(UpstreamError) as caught:
        await ask(together, job(n=3))

    assert caught.value.message == "Together returned 2 of the 3 images asked for."


@pytest.mark.anyio
async def test_url_on_a_foreign_host_is_never_fetched(together: Together, fake: FakeTogether) -> None:
    # `localhost` reaches the same fake, so a fetch would show up in fake.downloads.
    fake.return_urls, fake.url_host = True, "localhost"

    with pytest.raises(UpstreamError, match="host we do not download from"):
        await ask(together, job())

    assert fake.downloads == []


def test_fake_encodes_base64_png_by_default() -> None:
    # Guards the fake itself: base64 must round-trip to the size asked for.
    fake = FakeTogether()
    assert picture(base64.b64decode(fake.encode(fake.image(64, 32, "PNG"))))[:2] == ("PNG", (64, 32))


@pytest.mark.anyio
async def test_unreachable_host_is_retryable_and_keeps_its_cause(http: Http) -> None:
    # Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
    together = Together(Upstream(http, "http://127.0.0.1:9/v1", "test-key"))

    with pytest.raises(UpstreamError) as caught:
        await ask(together, job(n=6))

    detail = "Could not reach Together: ConnectionRefusedError (127.0.0.1:9)."
    assert (caught.value.message, caught.value.detail, caught.value.retryable) == (
        "Could not reach Together.",
        detail,
        True,
    )
    assert isinstance(caught.value.__cause__, aiohttp.ClientConnectorError)


def test_the_official_client_drives_the_fake(base_url: str) -> None:
    """Together's own client (`together`) against the fake: the fake cannot drift from the protocol."""
    root = base_url.removesuffix("/v1")  # the client adds /v1 itself
    client = together_sdk.Together(api_key="test-key", base_url=root, max_retries=0)
    response = client.images.generate(
        model="black-forest-labs/FLUX.1-schnell", prompt="a fox", width=512, height=256, n=2, steps=4
    )
    assert len(response.data) == 2
    assert all(getattr(item, "url", None) or getattr(item, "b64_json", None) for item in response.data)
    with pytest.raises(together_sdk.AuthenticationError):
        together_sdk.Together(api_key="wrong", base_url=root, max_retries=0).images.generate(
            model="black-forest-labs/FLUX.1-schnell", prompt="a fox"
        )
