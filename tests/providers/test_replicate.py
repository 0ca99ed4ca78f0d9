"""The Replicate adapter against a fake Replicate API served over real loopback HTTP."""

import asyncio
import base64
import dataclasses
import io
from collections.abc import Iterator

import httpx
import pytest
import replicate
from PIL import Image

from qubax.errors import ContentPolicyViolation, TaskFailed, UpstreamError
from qubax.pipeline.uploads import InputImage
from qubax.providers import GeneratedImage, Upstream
from qubax.providers.replicate import Replicate
from qubax.providers.transport import open_session
from tests.fakes import decode_data_uri
from tests.fakes.replicate import FILL, KONTEXT, NSFW_ERROR, PRO, SCHNELL, ULTRA, FakeReplicate
from tests.providers import Job, ask, run_adapter
from tests.server import serve

pytestmark = pytest.mark.anyio


@pytest.fixture
def fake() -> Iterator[FakeReplicate]:
    fake = FakeReplicate()
    with serve(fake.app) as base_url:
        fake.base_url = base_url
        yield fake


def port(fake: FakeReplicate) -> str:
    return fake.base_url.rsplit(":", 1)[1]


async def generate(fake: FakeReplicate, job: Job, key: str = "test-key") -> list[GeneratedImage]:
    return await run_adapter(Replicate, f"{fake.base_url}/v1", job, key)


def job(model: str = PRO, n: int = 1, width: int = 1024, height: int = 768, **extra: object) -> Job:
    return Job(model, "a red fox in snow", width, height, n, **extra)  # type: ignore[arg-type]


async def failure(fake: FakeReplicate, request: Job | None = None, key: str = "test-key") -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        await generate(fake, request or job(), key)
    return caught.value


def decoded(image: GeneratedImage) -> tuple[str | None, tuple[int, int]]:
    picture = Image.open(io.BytesIO(image.data))
    return picture.format, picture.size


async def test_pro_creates_one_custom_size_prediction_per_image(fake: FakeReplicate) -> None:
    images = await generate(fake, job(PRO, n=3, seed=7, safety_tolerance=5))

    expected = {
        "prompt": "a red fox in snow",
        "output_format": "png",
        "seed": 7,
        "safety_tolerance": 5,
        "aspect_ratio": "custom",
        "width": 1024,
        "height": 768,
    }
    assert fake.creates == [{"input": expected}] * 3
    assert len({prediction.id for prediction in fake.predictions}) == 3
    assert [decoded(image) for image in images] == [("PNG", (1024, 768))] * 3


async def test_pro_safety_tolerance_zero_is_clamped_to_replicates_minimum(fake: FakeReplicate) -> None:
    await generate(fake, job(PRO, safety_tolerance=0))

    assert fake.creates[0]["input"]["safety_tolerance"] == 1


async def test_ultra_sends_the_nearest_aspect_ratio_and_only_jpg_or_png(fake: FakeReplicate) -> None:
    images = await generate(fake, job(ULTRA, n=2, width=1344, height=768, seed=3, output_format="webp"))

    expected = {"prompt": "a red fox in snow", "output_format": "png", "seed": 3, "aspect_ratio": "16:9"}
    assert fake.creates == [{"input": expected}] * 2
    # Ultra makes ~4 MP whatever was asked: the bytes are passed through, the gateway resizes.
    assert [decoded(image) for image in images] == [("PNG", (2720, 1536))] * 2


async def test_ultra_jpeg_is_asked_for_as_jpg(fake: FakeReplicate) -> None:
    images = await generate(fake, job(ULTRA, width=1024, height=1024, output_format="jpeg", safety_tolerance=6))

    assert fake.creates[0]["input"] == {
        "prompt": "a red fox in snow",
        "output_format": "jpg",
        "safety_tolerance": 6,
        "aspect_ratio": "1:1",
    }
    assert decoded(images[0])[0] == "JPEG"


@pytest.mark.parametrize(
    ("width", "height", "megapixels", "size"),
    [(1024, 1024, "1", (1024, 1024)), (512, 512, "0.25", (512, 512)), (1344, 768, "1", (1344, 768))],
)
async def test_schnell_input_body(
    fake: FakeReplicate, width: int, height: int, megapixels: str, size: tuple[int, int]
) -> None:
    images = await generate(fake, job(SCHNELL, n=2, width=width, height=height, seed=11, safety_tolerance=2))

    ratio = "1:1" if width == height else "16:9"
    expected = {
        "prompt": "a red fox in snow",
        "output_format": "png",
        "seed": 11,
        "aspect_ratio": ratio,
        "megapixels": megapixels,
        "num_outputs": 2,
        "num_inference_steps": 4,
        "go_fast": True,
    }
    assert fake.creates == [{"input": expected}]  # no safety_tolerance: schnell has none
    assert [decoded(image) for image in images] == [("PNG", size)] * 2


async def test_schnell_splits_n_into_predictions_of_at_most_four(fake: FakeReplicate) -> None:
    images = await generate(fake, job(SCHNELL, n=6))

    assert sorted(body["input"]["num_outputs"] for body in fake.creates) == [2, 4]
    assert len(images) == 6


@pytest.mark.parametrize(("asked", "sent", "pillow"), [("webp", "webp", "WEBP"), ("jpeg", "jpg", "JPEG")])
async def test_outputs_are_passed_through_in_the_format_asked_for(
    fake: FakeReplicate, asked: str, sent: str, pillow: str
) -> None:
    images = await generate(fake, job(SCHNELL, n=2, output_format=asked))

    assert fake.creates[0]["input"]["output_format"] == sent
    assert {decoded(image)[0] for image in images} == {pillow}
    assert sorted(fake.downloads) == [f"/files/{fake.predictions[0].id}/out-{i}.{sent}" for i in range(2)]


async def test_data_uri_outputs_are_decoded(fake: FakeReplicate) -> None:
    fake.data_uris = True

    images = await generate(fake, job(PRO))

    assert decoded(images[0]) == ("PNG", (1024, 768))
    assert fake.downloads == []


async def test_prefer_wait_answered_at_once_needs_no_polling(fake: FakeReplicate) -> None:
    fake.fast = True

    images = await generate(fake, job(PRO))

    assert fake.create_headers[0]["prefer"] == "wait=15"  # half the default submission timeout
    assert fake.create_headers[0]["authorization"] == "Bearer test-key"
    assert fake.predictions[0].history == ["succeeded"]
    assert fake.polls == []
    assert len(images) == 1


async def test_polls_starting_then_processing_until_succeeded(fake: FakeReplicate) -> None:
    fake.running_polls = 3

    images = await generate(fake, job(PRO))

    prediction = fake.predictions[0]
    assert prediction.history == ["starting", "processing", "processing", "processing", "succeeded"]
    assert fake.polls == [prediction.id] * 4
    assert fake.auth_seen[:5] == ["Bearer test-key"] * 5
    assert fake.auth_seen[5:] == [None]  # the download carries no key
    assert decoded(images[0]) == ("PNG", (1024, 768))


@pytest.mark.parametrize(
    "error",
    [NSFW_ERROR, "The input or output was flagged as sensitive. Please try again with different inputs. (E005)"],
)
async def test_failed_for_nsfw_is_a_content_policy_violation(fake: FakeReplicate, error: str) -> None:
    fake.fail = error

    with pytest.raises(ContentPolicyViolation) as caught:
        await generate(fake, job(PRO))

    assert caught.value.code == "content_policy_violation"
    assert fake.downloads == []


async def test_every_schnell_output_dropped_is_a_content_policy_violation(fake: FakeReplicate) -> None:
    fake.drop = 4

    with pytest.raises(ContentPolicyViolation):
        await generate(fake, job(SCHNELL, n=4))

    assert fake.predictions[0].error == NSFW_ERROR


async def test_failed_for_another_reason_is_a_task_failure(fake: FakeReplicate) -> None:
    fake.fail = "CUDA out of memory"

    error = await failure(fake)

    assert isinstance(error, TaskFailed)
    assert "CUDA out of memory" in error.detail
    assert error.failover is True
    assert error.retryable is False


@pytest.mark.parametrize("status", ["canceled", "aborted"])
async def test_canceled_or_aborted_is_a_task_failure(fake: FakeReplicate, status: str) -> None:
    fake.final_status = status

    error = await failure(fake)

    assert isinstance(error, TaskFailed)
    assert status in error.message
    assert fake.downloads == []


async def test_unknown_status_stops_with_an_upstream_error(fake: FakeReplicate) -> None:
    fake.final_status = "exploded"

    error = await failure(fake)

    assert not isinstance(error, TaskFailed)
    assert "unknown prediction status" in error.message
    assert error.failover is False  # billed: the prediction ran
    assert len(fake.polls) == 2


async def test_dropped_outputs_fail_the_task_but_keep_the_good_images(fake: FakeReplicate) -> None:
    fake.drop = 1

    error = await failure(fake, job(SCHNELL, n=3))

    assert isinstance(error, TaskFailed)
    assert error.failover is True
    assert "2 of the 3" in error.message
    assert [decoded(image) for image in error.images] == [("PNG", (1152, 896))] * 2  # 4:3 at 1 MP


@pytest.mark.parametrize(
    ("status", "says"),
    [(401, "valid authentication token"), (402, "insufficient credit")],
)
async def test_credential_and_credit_errors_fail_over_without_retry(
    fake: FakeReplicate, status: int, says: str
) -> None:
    fake.create_status = status

    error = await failure(fake, job(PRO, n=2))

    assert f"({status})" in error.message
    assert says in error.detail
    assert (error.failover, error.retryable) == (True, False)
    assert fake.polls == []


async def test_wrong_key_fails_over_without_retry(fake: FakeReplicate) -> None:
    error = await failure(fake, key="not-the-key")

    assert "(401)" in error.message
    assert (error.failover, error.retryable) == (True, False)
    assert fake.creates == []


@pytest.mark.parametrize(("status", "says"), [(429, "Request was throttled"), (500, "Internal server error")])
async def test_throttling_and_server_errors_are_retryable(fake: FakeReplicate, status: int, says: str) -> None:
    fake.create_status = status

    error = await failure(fake)

    assert f"({status})" in error.message
    assert says in error.detail
    assert (error.failover, error.retryable) == (True, True)


async def test_validation_error_carries_replicates_detail(fake: FakeReplicate) -> None:
    error = await failure(fake, job(PRO, width=1000))  # not a multiple of 32

    assert "(422)" in error.message
    assert "multiple of 32" in error.detail
    assert error.retryable is False
    assert fake.predictions == []


async def test_garbage_create_answer_is_an_upstream_error(fake: FakeReplicate) -> None:
    fake.create_garbage = True

    error = await failure(fake)

    assert "not a JSON object" in error.message
    assert fake.polls == []


async def test_garbage_poll_answer_is_a_billed_upstream_error(fake: FakeReplicate) -> None:
    fake.poll_garbage = True

    error = await failure(fake)

    assert "not a JSON object" in error.message
    assert error.failover is False
    assert fake.downloads == []


async def test_a_poll_failure_that_persists_is_retryable_but_billed(fake: FakeReplicate) -> None:
    fake.poll_status = 503

    error = await failure(fake)

    assert "(503)" in error.message
    assert (error.failover, error.retryable) == (False, True)  # the prediction may be running: no failover
    assert len(fake.polls) == 6  # the first poll and five retries


async def test_prediction_url_on_a_foreign_host_never_gets_the_key(fake: FakeReplicate) -> None:
    # Same server, different host name: were the adapter to follow it, the fake would see the poll.
    fake.urls_host = "localhost"

    error = await failure(fake)

    assert "host we send the key to" in error.message
    assert error.failover is False
    assert fake.polls == []
    assert fake.auth_seen == ["Bearer test-key"]  # the create only


async def test_output_on_a_foreign_host_is_never_fetched(fake: FakeReplicate) -> None:
    fake.output_host = "localhost"

    error = await failure(fake)

    assert "host we do not download from" in error.message
    assert fake.downloads == []


@pytest.mark.parametrize(("status", "retryable"), [(404, False), (503, True)])
async def test_download_failure_is_a_billed_upstream_error(fake: FakeReplicate, status: int, retryable: bool) -> None:
    fake.download_status = status

    error = await failure(fake)

    assert f"({status})" in error.message
    assert (error.failover, error.retryable) == (False, retryable)
    assert len(fake.downloads) == 1


async def test_cancelling_cancels_the_predictions_and_leaks_nothing(fake: FakeReplicate) -> None:
    fake.running_polls = 10_000
    before = asyncio.all_tasks()
    async with open_session() as http:
        replicate = Replicate(Upstream(http, f"{fake.base_url}/v1", "test-key", poll_interval=0.01))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await ask(replicate, job(PRO, n=2))
        assert replicate.upstream.pool.slots.held == {}  # every slot given back
    assert asyncio.all_tasks() == before
    assert sorted(fake.cancels) == sorted(prediction.id for prediction in fake.predictions)
    assert len(fake.cancels) == 2
    assert {prediction.status for prediction in fake.predictions} == {"canceled"}
    await asyncio.sleep(0.05)  # polls already on the wire when we cancelled may still land
    polls = len(fake.polls)
    await asyncio.sleep(0.1)  # ten poll intervals: a leaked task would keep polling
    assert len(fake.polls) == polls


async def test_concurrency_cap_holds_for_each_prediction_until_it_ends(fake: FakeReplicate) -> None:
    fake.running_polls = 3
    async with open_session() as http, asyncio.timeout(10):
        upstream = Upstream(http, f"{fake.base_url}/v1", "test-key", poll_interval=0.01, concurrency=2)
        results = await asyncio.gather(*(ask(Replicate(upstream), job(PRO, n=2)) for _ in range(3)))

    assert [len(images) for images in results] == [2, 2, 2]
    assert len(fake.predictions) == 6
    assert fake.peak == 2


# --- Kontext and Fill, and the official client ------------------------------------------------------------


def data_uri(width: int, height: int, mode: str = "RGB") -> str:
    out = io.BytesIO()
    Image.new(mode, (width, height)).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


async def test_the_official_client_drives_the_fake_kontext_and_fill(fake: FakeReplicate) -> None:
    """Replicate's own client (`replicate`) against the fake: create, wait, poll, as the real API runs."""
    client = replicate.Client(api_token="test-key", base_url=fake.base_url)
    kontext = await client.async_run(
        KONTEXT[0], input={"prompt": "at night", "input_image": data_uri(300, 200)}, use_file_output=False
    )
    assert isinstance(kontext, str) and kontext.endswith(".png")  # one URI; png is Kontext's default
    assert fake.predictions[-1].input["input_image"].startswith("data:image/png")
    fill = await client.async_run(
        FILL,
        input={"prompt": "a door", "image": data_uri(256, 128), "mask": data_uri(256, 128, "L")},
        use_file_output=False,
    )
    assert isinstance(fill, str) and fill.endswith(".jpg")  # Fill's default is jpg
    async with httpx.AsyncClient() as http:
        downloaded = await http.get(fill)
    assert Image.open(io.BytesIO(downloaded.content)).size == (256, 128)
    with pytest.raises(replicate.exceptions.ReplicateError) as caught:
        await client.async_run(KONTEXT[1], input={"prompt": "p", "input_image": data_uri(8, 8), "safety_tolerance": 5})
    assert "safety_tolerance" in str(caught.value)


async def test_kontext_and_fill_inputs_as_replicate_takes_them(fake: FakeReplicate) -> None:
    async with open_session() as http:
        adapter = Replicate(Upstream(http, f"{fake.base_url}/v1", "test-key", poll_interval=0.01))
        request = dataclasses.replace(Job(PRO, "p", 1024, 768, 1, safety_tolerance=5).request(), images=(upload(),))
        [made] = await adapter.generate(request, KONTEXT[0])
        sent = fake.predictions[-1].input
        assert (sent["aspect_ratio"], sent["safety_tolerance"], sent["output_format"]) == ("4:3", 2, "png")
        mask = upload(mode="RGBA")
        [filled] = await adapter.generate(dataclasses.replace(request, mask=mask), FILL)
        sent = fake.predictions[-1].input
        assert set(sent) == {"prompt", "output_format", "safety_tolerance", "image", "mask"}
    assert Image.open(io.BytesIO(filled.data)).size == (64, 48)
    assert Image.open(io.BytesIO(made.data)).size == (1184, 896)


def upload(mode: str = "RGB") -> InputImage:
    out = io.BytesIO()
    Image.new(mode, (64, 48)).save(out, "PNG")
    out.seek(0)
    return InputImage(out, "a.png", "png", 64, 48, alpha=mode == "RGBA")


# --- FLUX.2 ------------------------------------------------------------------------------------------------


async def test_flux2_asks_its_custom_size_with_its_reference_images(fake: FakeReplicate) -> None:
    async with open_session() as http:
        adapter = Replicate(Upstream(http, f"{fake.base_url}/v1", "test-key", poll_interval=0.01))
        request = job("", n=2, width=1440, height=816, safety_tolerance=6).request()
        images = await adapter.generate(request, "black-forest-labs/flux-2-pro")
        edit = dataclasses.replace(request, n=1, images=(sized(64, 48), sized(32, 48)), steps=20, guidance=2.5)
        await adapter.generate(edit, "black-forest-labs/flux-2-flex")
    assert [Image.open(io.BytesIO(image.data)).size for image in images] == [(1440, 816)] * 2
    first, _, flex = (prediction.input for prediction in fake.predictions)
    expected = {"aspect_ratio": "custom", "width": 1440, "height": 816, "safety_tolerance": 5}
    assert {name: first[name] for name in expected} == expected and "input_images" not in first
    assert [decode_data_uri(uri).size for uri in flex["input_images"]] == [(64, 48), (32, 48)]  # type: ignore[union-attr]
    assert (flex["steps"], flex["guidance"]) == (20, 2.5)


async def test_the_official_client_drives_the_fake_flux2(fake: FakeReplicate) -> None:
    client = replicate.Client(api_token="test-key", base_url=fake.base_url)
    sized_input = {"aspect_ratio": "custom", "width": 1024, "height": 512}
    made = await client.async_run(
        "black-forest-labs/flux-2-max",
        input={"prompt": "p", "input_images": [data_uri(64, 64)], **sized_input},
        use_file_output=False,
    )
    assert isinstance(made, str) and made.endswith(".webp")  # one URI; webp is FLUX.2's default there
    with pytest.raises(replicate.exceptions.ReplicateError):  # steps are flex's
        await client.async_run("black-forest-labs/flux-2-pro", input={"prompt": "p", "steps": 20})


def sized(width: int, height: int) -> InputImage:
    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, "PNG")
    out.seek(0)
    return InputImage(out, "a.png", "png", width, height)
