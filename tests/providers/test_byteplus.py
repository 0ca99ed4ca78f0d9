import base64
import dataclasses
import io
from collections.abc import AsyncIterator, Iterator

import openai
import pytest
from PIL import Image

from qubax.errors import ContentPolicyViolation, TaskFailed, UpstreamError
from qubax.pipeline.uploads import InputImage
from qubax.providers import Upstream
from qubax.providers.byteplus import INFO, ModelArk
from qubax.providers.transport import Http, open_session
from qubax.routing.request import ImageRequest
from tests.fakes import decode_data_uri
from tests.fakes.byteplus import FakeModelArk
from tests.providers import Job, ask
from tests.server import serve

SEEDREAM_4 = "seedream-4-0-250828"
SEEDREAM_45 = "seedream-4-5-251128"


@pytest.fixture
def fake() -> FakeModelArk:
    return FakeModelArk()


@pytest.fixture
def base_url(fake: FakeModelArk) -> Iterator[str]:
    with serve(fake.app) as url:
        yield f"{url}/api/v3"


@pytest.fixture
async def http() -> AsyncIterator[Http]:
    async with open_session() as client:
        yield client


@pytest.fixture
def modelark(http: Http, base_url: str) -> ModelArk:
    return ModelArk(Upstream(http, base_url, "test-key", poll_interval=0.01, delivery_hosts=INFO.delivery_hosts))


def job(n: int = 1, model: str = SEEDREAM_4, width: int = 1280, height: int = 960) -> Job:
    return Job(model=model, prompt="a lighthouse at dusk", width=width, height=height, n=n)


def upload(width: int, height: int) -> InputImage:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(out, "PNG")
    out.seek(0)
    return InputImage(out, "a.png", "png", width, height)


def edit(images: int, n: int = 1) -> ImageRequest:
    return dataclasses.replace(job(n).request(), images=tuple(upload(64 + i, 48) for i in range(images)))


def picture(data: bytes) -> tuple[str | None, tuple[int, int]]:
    image = Image.open(io.BytesIO(data))
    return image.format, image.size


@pytest.mark.anyio
async def test_one_call_an_image_at_the_exact_size_without_watermark(modelark: ModelArk, fake: FakeModelArk) -> None:
    images = await ask(modelark, job(n=3, width=1600, height=600))

    request = {
        "model": SEEDREAM_4,
        "prompt": "a lighthouse at dusk",
        "size": "1600x600",
        "sequential_image_generation": "disabled",
        "response_format": "b64_json",
        "watermark": False,
    }
    assert fake.requests == [request] * 3
    assert [picture(image.data) for image in images] == [("JPEG", (1600, 600))] * 3
    assert len({image.data for image in images}) == 3


@pytest.mark.anyio
async def test_watermark_is_sent_when_asked(modelark: ModelArk, fake: FakeModelArk) -> None:
    await modelark.generate(dataclasses.replace(job().request(), watermark=True), SEEDREAM_4)

    assert fake.requests[0]["watermark"] is True


@pytest.mark.anyio
async def test_one_reference_image_is_sent_as_a_data_uri(modelark: ModelArk, fake: FakeModelArk) -> None:
    await modelark.generate(edit(1), SEEDREAM_4)

    sent = fake.requests[0]["image"]
    assert isinstance(sent, str) and sent.startswith("data:image/png;base64,")
    assert decode_data_uri(sent).size == (64, 48)  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_several_reference_images_are_sent_as_a_list_in_order(modelark: ModelArk, fake: FakeModelArk) -> None:
    await modelark.generate(edit(10, n=2), SEEDREAM_4)

    assert len(fake.requests) == 2
    sent = fake.requests[0]["image"]
    assert [decode_data_uri(uri).size for uri in sent] == [(64 + i, 48) for i in range(10)]  # type: ignore[union-attr]
    assert fake.requests[1]["image"] == sent


@pytest.mark.anyio
async def test_url_results_are_downloaded(modelark: ModelArk, fake: FakeModelArk) -> None:
    fake.return_urls = True

    [image] = await ask(modelark, job())

    assert fake.downloads == ["/files/img-0"]
    assert image.data == fake.files["img-0"]


@pytest.mark.anyio
async def test_url_on_a_foreign_host_is_never_fetched(modelark: ModelArk, fake: FakeModelArk) -> None:
    fake.return_urls, fake.url_host = True, "localhost"  # reaches the same fake: a fetch would show

    with pytest.raises(UpstreamError, match="host we do not download from"):
        await ask(modelark, job())

    assert fake.downloads == []


@pytest.mark.anyio
@pytest.mark.parametrize(
    "code",
    ["InputTextSensitiveContentDetected", "InputImageSensitiveContentDetected", "SensitiveContentDetected.Violence"],
)
async def test_a_sensitive_content_refusal_is_a_content_policy_violation(
    modelark: ModelArk, fake: FakeModelArk, code: str
) -> None:
    fake.refuse = code

    with pytest.raises(ContentPolicyViolation) as caught:
        await ask(modelark, job())

    assert (caught.value.status_code, caught.value.code) == (400, "content_policy_violation")


@pytest.mark.anyio
async def test_an_image_its_output_check_refused_is_a_content_policy_violation(
    modelark: ModelArk, fake: FakeModelArk
) -> None:
    fake.item_error = "OutputImageSensitiveContentDetected"

    with pytest.raises(ContentPolicyViolation):
        await ask(modelark, job())


@pytest.mark.anyio
async def test_an_image_that_failed_otherwise_is_an_unbilled_failure(modelark: ModelArk, fake: FakeModelArk) -> None:
    fake.item_error = "InternalServiceError"

    with pytest.raises(TaskFailed) as caught:
        await ask(modelark, job())

    assert caught.value.failover is True


@pytest.mark.anyio
async def test_a_plain_invalid_parameter_is_not_a_content_policy_violation(
    modelark: ModelArk, fake: FakeModelArk
) -> None:
    with pytest.raises(UpstreamError) as caught:
        await ask(modelark, job(width=100, height=100))  # under the fake's pixel minimum

    assert type(caught.value) is UpstreamError
    assert caught.value.message == "BytePlus ModelArk refused the request (400)."
    assert "size" in caught.value.detail
    assert (caught.value.retryable, caught.value.failover) == (False, False)


@pytest.mark.anyio
@pytest.mark.parametrize(("status", "retryable"), [(429, True), (500, True), (503, True)])
async def test_busy_statuses_are_retryable(
    modelark: ModelArk, fake: FakeModelArk, status: int, retryable: bool
) -> None:
    fake.fail_status = status

    with pytest.raises(UpstreamError) as caught:
        await ask(modelark, job())

    assert (caught.value.retryable, caught.value.failover) == (retryable, True)


@pytest.mark.anyio
async def test_a_wrong_key_moves_on_without_retrying(http: Http, base_url: str) -> None:
    modelark = ModelArk(Upstream(http, base_url, "wrong-key"))

    with pytest.raises(UpstreamError) as caught:
        await ask(modelark, job())

    assert caught.value.message == "BytePlus ModelArk could not serve the request (401)."
    assert caught.value.detail.startswith("the configured credential was rejected: The API key")
    assert (caught.value.retryable, caught.value.failover) == (False, True)


@pytest.mark.anyio
async def test_invalid_base64_is_an_upstream_error(modelark: ModelArk, fake: FakeModelArk) -> None:
    fake.bad_base64 = True

    with pytest.raises(UpstreamError, match="not valid base64"):
        await ask(modelark, job())


def test_provider_info() -> None:
    assert (INFO.name, INFO.credential, INFO.base_url_variable) == (
        "byteplus",
        "ARK_API_KEY",
        "QUBAX_BYTEPLUS_BASE_URL",
    )
    assert INFO.base_url == "https://ark.ap-southeast.bytepluses.com/api/v3"


def test_the_openai_sdk_drives_the_fake(fake: FakeModelArk, base_url: str) -> None:
    """ModelArk's API is OpenAI-shaped: the `openai` SDK against the fake, ModelArk's own fields in
    `extra_body`, so the fake cannot drift from what an OpenAI-shaped client sends and reads."""
    client = openai.OpenAI(base_url=base_url, api_key="test-key", max_retries=0)
    reference = "data:image/png;base64," + base64.b64encode(png(32, 32)).decode()

    response = client.images.generate(
        model=SEEDREAM_45,
        prompt="four seasons of one garden",
        size="2560x1440",  # type: ignore[arg-type]  # the SDK's literal sizes are OpenAI's
        response_format="b64_json",
        extra_body={
            "image": [reference, reference],
            "sequential_image_generation": "auto",
            "sequential_image_generation_options": {"max_images": 3},
            "watermark": False,
        },
    )

    assert [picture(base64.b64decode(item.b64_json or "")) for item in response.data or []] == [
        ("JPEG", (2560, 1440))
    ] * 3
    assert response.usage is not None and response.usage.to_dict()["generated_images"] == 3
    assert fake.requests[-1]["sequential_image_generation_options"] == {"max_images": 3}
    url = client.images.generate(model=SEEDREAM_4, prompt="a fox", size="1K", extra_body={"watermark": True})  # type: ignore[arg-type]
    assert url.data is not None and url.data[0].url is not None and "/files/" in url.data[0].url
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model=SEEDREAM_45, prompt="a fox", size="1K")  # type: ignore[arg-type]
    assert caught.value.code == "InvalidParameter"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).images.generate(model=SEEDREAM_4, prompt="p")


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, "PNG")
    return out.getvalue()
