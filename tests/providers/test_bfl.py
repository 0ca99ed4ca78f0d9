"""The BFL adapter against a fake BFL API served over real loopback HTTP."""

import asyncio
import dataclasses
import io
from collections.abc import Iterator

import pytest
from PIL import Image

from qubax.errors import ContentPolicyViolation, TaskFailed, UpstreamError
from qubax.pipeline.uploads import InputImage
from qubax.providers import GeneratedImage, Upstream
from qubax.providers.bfl import BFL
from qubax.providers.transport import open_session
from qubax.routing.request import ImageRequest
from tests.fakes import decode_image
from tests.fakes.bfl import FakeBFL
from tests.providers import Job, ask, run_adapter
from tests.server import serve

pytestmark = pytest.mark.anyio

PRO = "flux-pro-1.1"
ULTRA = "flux-pro-1.1-ultra"


@pytest.fixture
def fake() -> Iterator[FakeBFL]:
    fake = FakeBFL()
    with serve(fake.app) as base_url:
        fake.base_url = base_url
        yield fake


def port(fake: FakeBFL) -> str:
    return fake.base_url.rsplit(":", 1)[1]


async def generate(fake: FakeBFL, job: Job, key: str = "test-key") -> list[GeneratedImage]:
    return await run_adapter(BFL, fake.base_url, job, key)


def pro(n: int = 1, width: int = 1024, height: int = 768) -> Job:
    return Job(PRO, "a red fox in snow", width, height, n)


async def failure(fake: FakeBFL, job: Job | None = None, key: str = "test-key") -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        await generate(fake, job or pro(), key)
    return caught.value


async def test_pro_submits_one_task_per_image_and_returns_them_all(fake: FakeBFL) -> None:
    images = await generate(fake, pro(n=3, width=1024, height=768))

    assert (
        fake.submissions == [{"prompt": "a red fox in snow", "output_format": "png", "width": 1024, "height": 768}] * 3
    )
    assert len({task.id for task in fake.tasks}) == 3
    assert len(images) == 3
    for image in images:
        decoded = Image.open(io.BytesIO(image.data))
        assert (decoded.format, decoded.size) == ("PNG", (1024, 768))
    assert sorted(fake.downloads) == sorted(f"/delivery/{task.id}.png" for task in fake.tasks)
    assert fake.download_keys == [None] * 3  # signed delivery URLs never get the key


@pytest.mark.parametrize(
    ("width", "height", "ratio"), [(2752, 1536, "16:9"), (2048, 2048, "1:1"), (1344, 3136, "9:21")]
)
async def test_ultra_sends_aspect_ratio_instead_of_size(fake: FakeBFL, width: int, height: int, ratio: str) -> None:
    images = await generate(fake, Job(ULTRA, "a lighthouse", width, height, 1))

    assert fake.submissions == [{"prompt": "a lighthouse", "output_format": "png", "aspect_ratio": ratio}]
    assert Image.open(io.BytesIO(images[0].data)).size == (width, height)


async def test_polls_through_pending_until_ready(fake: FakeBFL) -> None:
    fake.pending_polls = 4

    images = await generate(fake, pro())

    assert fake.polls == [fake.tasks[0].id] * 5
    assert Image.open(io.BytesIO(images[0].data)).size == (1024, 768)


async def test_whatever_format_bfl_delivers_is_passed_through(fake: FakeBFL) -> None:
    fake.image_format = "WEBP"

    images = await generate(fake, pro())

    assert Image.open(io.BytesIO(images[0].data)).format == "WEBP"


@pytest.mark.parametrize("status", ["Request Moderated", "Content Moderated"])
async def test_moderation_is_a_content_policy_violation(fake: FakeBFL, status: str) -> None:
    fake.moderate = status

    with pytest.raises(ContentPolicyViolation) as caught:
        await generate(fake, pro())

    assert caught.value.status_code == 400
    assert caught.value.code == "content_policy_violation"
    assert fake.downloads == []


async def test_error_status_is_a_final_upstream_error_with_details(fake: FakeBFL) -> None:
    fake.status_sequence = ["Pending", "Error"]
    fake.error_details = {"reason": "GPU fell over"}

    error = await failure(fake)

    assert "GPU fell over" in error.detail
    assert error.retryable is False
    assert len(fake.polls) == 2


@pytest.mark.parametrize("status", ["Task not found", "Failed", "Processing", None])
async def test_unknown_task_and_unknown_statuses_stop_polling(fake: FakeBFL, status: str | None) -> None:
    fake.status_sequence = [status]  # type: ignore[list-item]

    error = await failure(fake)

    assert error.retryable is False
    assert len(fake.polls) == 1
    assert fake.downloads == []


async def test_poll_404_is_an_upstream_error(fake: FakeBFL) -> None:
    fake.poll_status = 404

    error = await failure(fake)

    assert "no longer knows the task (404)" in error.message
    assert error.retryable is False
    assert len(fake.polls) == 1


async def test_poll_5xx_goes_through_the_status_mapping(fake: FakeBFL) -> None:
    fake.poll_status = 503

    error = await failure(fake)

    assert "503" in error.message
    assert error.retryable is True


async def test_garbage_poll_response_is_an_upstream_error(fake: FakeBFL) -> None:
    fake.poll_garbage = True

    error = await failure(fake)

    assert "not a JSON object" in error.message
    assert fake.downloads == []


@pytest.mark.parametrize(
    ("status", "retryable", "says"),
    [
        (401, False, "credential"),
        (402, False, "Insufficient credits"),
        (429, True, "active tasks"),
        (500, True, "Internal Server Error"),
        (503, True, "Service Unavailable"),
    ],
)
async def test_submit_errors_map_to_upstream_errors(fake: FakeBFL, status: int, retryable: bool, says: str) -> None:
    fake.submit_status = status

    error = await failure(fake, pro(n=2))

    assert f"({status})" in error.message
    assert says in error.detail
    assert error.retryable is retryable
    assert fake.polls == []


async def test_wrong_key_is_a_final_upstream_error(fake: FakeBFL) -> None:
    error = await failure(fake, key="not-the-key")

    assert "401" in error.message
    assert error.retryable is False
    assert fake.submissions == []


async def test_validation_error_422_carries_the_message(fake: FakeBFL) -> None:
    error = await failure(fake, pro(width=1000))  # not a multiple of 32

    assert "(422)" in error.message
    assert "multiple of 32" in error.detail
    assert error.retryable is False
    assert fake.tasks == []


@pytest.mark.parametrize("response", [{"cost": 4}, {"id": "abc"}, {"id": "abc", "polling_url": None}])
async def test_submit_without_id_or_polling_url_is_an_upstream_error(
    fake: FakeBFL, response: dict[str, object]
) -> None:
    fake.submit_response = response

    error = await failure(fake)

    assert "polling_url" in error.message
    assert fake.polls == []


async def test_polling_url_on_a_foreign_host_never_gets_the_key(fake: FakeBFL) -> None:
    # Same server, different host name: were the adapter to follow it, the fake would see the poll.
    fake.polling_url_override = f"http://localhost:{port(fake)}/v1/get_result?id=stolen"

    error = await failure(fake)

    assert "polling URL" in error.message
    assert fake.polls == []


@pytest.mark.parametrize(
    "url", ["https://api.bfl.ai.evil.example/v1/get_result?id=1", "http://api.eu.bfl.ai/v1/get_result?id=1"]
)
async def test_key_only_goes_to_bfl_hosts_over_https(fake: FakeBFL, url: str) -> None:
    fake.polling_url_override = url

    error = await failure(fake)

    assert "polling URL" in error.message
    assert error.retryable is False  # refused before any connection attempt


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://localhost:{port}/delivery/x.png"])
async def test_sample_url_on_a_foreign_host_is_never_fetched(fake: FakeBFL, url: str) -> None:
    fake.sample_url_override = url.format(port=port(fake))

    error = await failure(fake)

    assert "host we do not download from" in error.message
    assert fake.downloads == []


async def test_download_failure_is_an_upstream_error(fake: FakeBFL) -> None:
    fake.download_status = 404

    error = await failure(fake)

    assert "(404)" in error.message
    assert fake.downloads == [f"/delivery/{fake.tasks[0].id}.png"]


async def test_one_failed_task_keeps_the_others_images(fake: FakeBFL) -> None:
    # The other tasks are billed anyway: their images are kept, and only the failed one may go elsewhere.
    fake.statuses_for = {1: ["Pending", "Pending", "Error"]}

    error = await failure(fake, pro(n=3))

    assert isinstance(error, TaskFailed) and error.failover
    assert "failed to generate" in error.message
    assert len(error.images) == 2
    assert len(fake.downloads) == 2


async def test_cancelling_stops_every_task_and_leaks_nothing(fake: FakeBFL) -> None:
    fake.pending_polls = 10_000
    before = asyncio.all_tasks()
    async with open_session() as http:
        bfl = BFL(Upstream(http, fake.base_url, "test-key", poll_interval=0.01))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await ask(bfl, pro(n=3))
        assert bfl.upstream.pool.slots.held == {}  # every slot given back
        assert (
            http.session.connector is not None and not http.session.connector._acquired
        )  # no connection left checked out
    assert asyncio.all_tasks() == before
    await asyncio.sleep(0.05)  # polls already on the wire when we cancelled may still land
    polls = len(fake.polls)
    await asyncio.sleep(0.1)  # ten poll intervals: a leaked task would keep polling
    assert len(fake.polls) == polls


# --- FLUX.2 ------------------------------------------------------------------------------------------------


def flux2(model: str = "flux-2-pro", images: int = 0, **changes: object) -> ImageRequest:
    """A FLUX.2 request at 1440x816 (multiples of 16, not of 32) with `images` reference images."""
    request = Job(model, "a fox", 1440, 816, 1).request()
    uploads = tuple(upload(64 + i, 48) for i in range(images))
    return dataclasses.replace(request, images=uploads, **changes)  # type: ignore[arg-type]


def upload(width: int, height: int) -> InputImage:
    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, "PNG")
    out.seek(0)
    return InputImage(out, "a.png", "png", width, height)


async def make(fake: FakeBFL, request: ImageRequest, model: str) -> list[GeneratedImage]:
    async with open_session() as http, asyncio.timeout(10):
        return await BFL(Upstream(http, fake.base_url, "test-key", poll_interval=0.01)).generate(request, model)


async def test_flux2_sends_width_height_and_every_reference_image(fake: FakeBFL) -> None:
    request = flux2(images=8, n=2, seed=7, safety_tolerance=6, output_format="webp")

    images = await make(fake, request, "flux-2-max")

    assert len(images) == 2 and len(fake.tasks) == 2  # one task per image
    sent = fake.submissions[0]
    inputs = ["input_image", *(f"input_image_{i}" for i in range(2, 9))]
    assert [decode_image(sent[name]).size for name in inputs] == [(64 + i, 48) for i in range(8)]  # type: ignore[union-attr]
    # FLUX.2 takes safety_tolerance up to 5 and jpeg or png: webp is converted on our side.
    expected = {"prompt": "a fox", "width": 1440, "height": 816, "seed": 7, "safety_tolerance": 5}
    assert {name: sent[name] for name in expected} == expected and sent["output_format"] == "png"
    assert Image.open(io.BytesIO(images[0].data)).size == (1440, 816)


async def test_flux2_flex_sends_steps_and_guidance(fake: FakeBFL) -> None:
    await make(fake, flux2("flux-2-flex", steps=28, guidance=3.5), "flux-2-flex")
    await make(fake, flux2("flux-2-pro"), "flux-2-pro")

    assert (fake.submissions[0]["steps"], fake.submissions[0]["guidance"]) == (28, 3.5)
    assert "steps" not in fake.submissions[1] and "guidance" not in fake.submissions[1]
    assert "input_image" not in fake.submissions[1]  # a generation sends no reference image


async def test_the_fake_refuses_what_flux2_does_not_take(fake: FakeBFL) -> None:
    """The fake's checks, which the tests above rely on, follow BFL's FLUX.2 schema."""
    with pytest.raises(UpstreamError):
        await make(fake, flux2("flux-2-pro", steps=28), "flux-2-pro")  # steps are flex's
    with pytest.raises(UpstreamError):
        await make(fake, flux2("flux-2-klein-4b", images=5), "flux-2-klein-4b")  # klein takes 4
