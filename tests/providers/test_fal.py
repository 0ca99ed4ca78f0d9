"""The fal.ai adapter against a fake fal queue served over real loopback HTTP."""

import asyncio
import base64
import dataclasses
import io
import time
from collections.abc import Iterator
from typing import Any

import fal_client
import pytest
from PIL import Image

from qubax.errors import ContentPolicyViolation, TaskFailed, UpstreamError
from qubax.pipeline.uploads import InputImage
from qubax.providers import GeneratedImage, Upstream
from qubax.providers.fal import Fal
from qubax.providers.transport import open_session
from tests.fakes import decode_data_uri
from tests.fakes.bfl import ULTRA_SIZES
from tests.fakes.fal import PRO, SCHNELL, ULTRA, FakeFal
from tests.providers import Job, ask, run_adapter
from tests.server import serve

pytestmark = pytest.mark.anyio


@pytest.fixture
def fake() -> Iterator[FakeFal]:
    fake = FakeFal()
    with serve(fake.app) as base_url:
        fake.base_url = base_url
        yield fake


def port(fake: FakeFal) -> str:
    return fake.base_url.rsplit(":", 1)[1]


async def generate(fake: FakeFal, job: Job, key: str = "test-key") -> list[GeneratedImage]:
    return await run_adapter(Fal, fake.base_url, job, key)


def pro(n: int = 1, **extras: Any) -> Job:
    return Job(PRO, "a red fox in snow", 1024, 768, n, **extras)


async def failure(fake: FakeFal, job: Job | None = None, key: str = "test-key") -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        await generate(fake, job or pro(), key)
    return caught.value


def decoded(image: GeneratedImage) -> Image.Image:
    return Image.open(io.BytesIO(image.data))


def colour(image: GeneratedImage) -> tuple[int, ...]:
    return decoded(image).convert("RGB").getpixel((0, 0))  # type: ignore[return-value]


async def test_pro_sends_image_size_seed_and_string_safety_tolerance(fake: FakeFal) -> None:
    images = await generate(fake, pro(n=2, seed=7, safety_tolerance=3))

    assert fake.models == [PRO]
    assert fake.submissions == [
        {
            "prompt": "a red fox in snow",
            "num_images": 2,
            "output_format": "png",
            "seed": 7,
            "image_size": {"width": 1024, "height": 768},
            "enable_safety_checker": True,
            "safety_tolerance": "3",
        }
    ]
    assert [(decoded(image).format, decoded(image).size) for image in images] == [("PNG", (1024, 768))] * 2
    request_id = fake.requests[0].id
    assert sorted(fake.downloads) == [f"/files/{request_id}-0.png", f"/files/{request_id}-1.png"]


async def test_the_key_goes_to_the_queue_and_never_to_media_urls(fake: FakeFal) -> None:
    await generate(fake, pro(n=2))

    seen = {(method, path.startswith("/files/"), auth) for method, path, auth in fake.authorizations}
    assert seen == {("POST", False, "Key test-key"), ("GET", False, "Key test-key"), ("GET", True, None)}


async def test_schnell_sends_four_steps_and_no_safety_tolerance(fake: FakeFal) -> None:
    images = await generate(fake, Job(SCHNELL, "a cat", 512, 512, 1, seed=3, safety_tolerance=5))

    assert fake.models == [SCHNELL]
    assert fake.submissions == [
        {
            "prompt": "a cat",
            "num_images": 1,
            "output_format": "png",
            "seed": 3,
            "image_size": {"width": 512, "height": 512},
            "enable_safety_checker": True,
            "num_inference_steps": 4,
        }
    ]
    assert decoded(images[0]).size == (512, 512)


async def test_queue_urls_without_the_sub_path_are_followed_as_returned(fake: FakeFal) -> None:
    await generate(fake, Job(SCHNELL, "a cat", 512, 512, 1))

    request_id = fake.requests[0].id
    paths = [path for _, path, _ in fake.authorizations if not path.startswith("/files/")]
    assert paths == [
        "/fal-ai/flux/schnell",
        f"/fal-ai/flux/requests/{request_id}/status",
        f"/fal-ai/flux/requests/{request_id}/status",
        f"/fal-ai/flux/requests/{request_id}/status",
        f"/fal-ai/flux/requests/{request_id}",
    ]


@pytest.mark.parametrize(
    ("width", "height", "ratio"),
    [
        (2752, 1536, "16:9"),
        (2048, 2048, "1:1"),
        (1344, 3136, "9:21"),
        (1280, 1024, "4:3"),  # 5:4 is not in fal's enum: 4:3 is nearer than 1:1
        (1024, 1280, "3:4"),
        (1152, 1024, "1:1"),  # also 5:4 to aspect_ratio(), but nearer 1:1 than 4:3
    ],
)
async def test_ultra_sends_an_aspect_ratio_from_fals_enum(fake: FakeFal, width: int, height: int, ratio: str) -> None:
    images = await generate(fake, Job(ULTRA, "a lighthouse", width, height, 1, safety_tolerance=6, seed=1))

    assert fake.models == [ULTRA]
    assert fake.submissions == [
        {
            "prompt": "a lighthouse",
            "num_images": 1,
            "output_format": "png",
            "seed": 1,
            "aspect_ratio": ratio,
            "safety_tolerance": "6",
        }
    ]
    assert decoded(images[0]).size == ULTRA_SIZES[ratio]


async def test_ultra_takes_several_images_per_request(fake: FakeFal) -> None:
    images = await generate(fake, Job(ULTRA, "a lighthouse", 2048, 2048, 3))

    assert [body["num_images"] for body in fake.submissions] == [3]
    assert len(images) == 3


@pytest.mark.parametrize(("tolerance", "sent"), [(0, "1"), (2, "2"), (6, "6")])
async def test_safety_tolerance_is_a_string_from_1_to_6(fake: FakeFal, tolerance: int, sent: str) -> None:
    await generate(fake, pro(safety_tolerance=tolerance))

    assert fake.submissions[0]["safety_tolerance"] == sent


@pytest.mark.parametrize(
    ("asked", "sent", "pillow"), [(None, "png", "PNG"), ("webp", "png", "PNG"), ("jpeg", "jpeg", "JPEG")]
)
async def test_output_format_is_jpeg_or_png(fake: FakeFal, asked: str | None, sent: str, pillow: str) -> None:
    images = await generate(fake, pro(output_format=asked))

    assert fake.submissions[0]["output_format"] == sent
    assert decoded(images[0]).format == pillow


async def test_whatever_fal_delivers_is_passed_through_as_is(fake: FakeFal) -> None:
    fake.image_format = "JPEG"

    images = await generate(fake, pro())

    assert images[0].data == next(iter(fake.files.values()))[0]
    assert decoded(images[0]).format == "JPEG"


async def test_six_images_are_split_into_requests_of_four_and_two(fake: FakeFal) -> None:
    images = await generate(fake, pro(n=6))

    assert sorted(body["num_images"] for body in fake.submissions) == [2, 4]
    assert len(images) == 6
    assert len(set(fake.downloads)) == 6


async def test_polls_through_in_queue_and_in_progress_until_completed(fake: FakeFal) -> None:
    fake.queued_polls, fake.running_polls = 2, 3

    images = await generate(fake, pro())

    request_id = fake.requests[0].id
    assert fake.polls == [request_id] * 6
    assert fake.results == [request_id]  # the fake answers 400 to a result fetched before COMPLETED
    assert len(images) == 1


async def test_inline_data_uris_are_decoded(fake: FakeFal) -> None:
    fake.data_uris = True

    images = await generate(fake, pro(n=2))

    assert [decoded(image).size for image in images] == [(1024, 768)] * 2
    assert fake.downloads == []


async def test_a_data_uri_that_is_not_base64_is_an_upstream_error(fake: FakeFal) -> None:
    fake.image_url_override = "data:image/png;base64,%%% not base64 %%%"

    error = await failure(fake)

    assert "not valid base64" in error.message
    assert error.failover is False  # the request ran: it is billed


async def test_moderation_on_submit_is_a_content_policy_violation(fake: FakeFal) -> None:
    fake.moderate_on_submit = True

    with pytest.raises(ContentPolicyViolation) as caught:
        await generate(fake, pro())

    assert caught.value.code == "content_policy_violation"
    assert fake.polls == []


async def test_moderation_in_the_result_is_a_content_policy_violation(fake: FakeFal) -> None:
    fake.result_error = 422

    with pytest.raises(ContentPolicyViolation):
        await generate(fake, pro())

    assert len(fake.results) == 1
    assert fake.downloads == []


async def test_a_plain_validation_error_is_not_moderation(fake: FakeFal) -> None:
    error = await failure(fake, Job(SCHNELL, "", 512, 512, 1))  # fal requires a prompt

    assert "(422)" in error.message
    assert "prompt" in error.detail
    assert not isinstance(error, ContentPolicyViolation)
    assert error.retryable is False


async def test_a_failing_result_goes_through_the_status_mapping_and_is_billed(fake: FakeFal) -> None:
    fake.result_error = 500

    error = await failure(fake)

    assert "failed (500)" in error.message
    assert error.retryable is True
    assert error.failover is False


async def test_flagged_images_are_withheld_and_the_rest_kept(fake: FakeFal) -> None:
    fake.nsfw = [False, True, False]

    error = await failure(fake, pro(n=3))

    assert isinstance(error, TaskFailed) and error.failover
    assert "2 of the 3" in error.message
    assert len(error.images) == 2
    assert all(colour(image) != (0, 0, 0) for image in error.images)  # fal blacks out what it flags
    request_id = fake.requests[0].id
    assert sorted(fake.downloads) == [f"/files/{request_id}-0.png", f"/files/{request_id}-2.png"]


async def test_flagged_images_across_a_split_keep_every_good_image(fake: FakeFal) -> None:
    fake.nsfw = [True]  # the first image of each request

    error = await failure(fake, pro(n=6))

    assert isinstance(error, TaskFailed)
    assert len(error.images) == 4


async def test_all_images_flagged_is_a_content_policy_violation(fake: FakeFal) -> None:
    fake.nsfw = [True, True]

    with pytest.raises(ContentPolicyViolation):
        await generate(fake, pro(n=2))

    assert fake.downloads == []


async def test_an_exhausted_balance_fails_over_but_is_not_retried(fake: FakeFal) -> None:
    fake.submit_status = 403

    error = await failure(fake)

    assert "(403)" in error.message
    assert "Exhausted balance" in error.detail
    assert error.failover is True
    assert error.retryable is False
    assert fake.polls == []


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_busy_or_failing_submits_are_retryable(fake: FakeFal, status: int) -> None:
    fake.submit_status = status

    error = await failure(fake, pro(n=6))

    assert f"({status})" in error.message
    assert error.retryable is True
    assert error.failover is True
    assert fake.polls == []


async def test_wrong_key_is_refused(fake: FakeFal) -> None:
    error = await failure(fake, key="not-the-key")

    assert "(401)" in error.message
    assert error.retryable is False
    assert fake.submissions == []


async def test_completed_with_an_error_is_a_failed_task(fake: FakeFal) -> None:
    fake.completed_with_error = "Runner disconnected"

    error = await failure(fake)

    assert isinstance(error, TaskFailed) and error.failover
    assert "Runner disconnected" in error.detail
    assert fake.results == []


async def test_garbage_on_submit_is_an_upstream_error(fake: FakeFal) -> None:
    fake.submit_garbage = True

    error = await failure(fake)

    assert "not a JSON object" in error.message
    assert fake.polls == []


async def test_a_failing_status_is_retried_then_a_billed_upstream_error(fake: FakeFal) -> None:
    fake.poll_status = 503

    error = await failure(fake)

    assert "failed (503)" in error.message
    assert error.retryable is True
    assert error.failover is False
    assert len(fake.polls) == 6  # the first poll and five retries


async def test_garbage_status_is_a_billed_upstream_error(fake: FakeFal) -> None:
    fake.status_garbage = True

    error = await failure(fake)

    assert "not a JSON object" in error.message
    assert error.failover is False
    assert len(fake.polls) == 1
    assert fake.results == []


@pytest.mark.parametrize(
    "response", [{"status": "IN_QUEUE"}, {"request_id": "x", "status_url": "https://queue.fal.run/a/b/requests/x"}]
)
async def test_submit_without_queue_urls_is_an_upstream_error(fake: FakeFal, response: dict[str, object]) -> None:
    fake.submit_response = response

    error = await failure(fake)

    assert "queue URLs" in error.message
    assert fake.polls == []


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:{port}/fal-ai/flux-pro/requests/stolen/status",  # same server, another name
        "https://queue.fal.run.evil.example/fal-ai/flux-pro/requests/1/status",
        "http://queue.fal.run/fal-ai/flux-pro/requests/1/status",  # a fal host, but not over https
    ],
)
async def test_a_status_url_on_a_foreign_host_never_gets_the_key(fake: FakeFal, url: str) -> None:
    fake.status_url_override = url.format(port=port(fake))

    error = await failure(fake)

    assert "queue URL on a host we do not send the key to" in error.message
    assert error.retryable is False  # refused before any connection attempt
    assert fake.polls == []


async def test_a_cancel_url_on_a_foreign_host_is_refused_up_front(fake: FakeFal) -> None:
    fake.cancel_url_override = f"http://localhost:{port(fake)}/fal-ai/flux-pro/requests/stolen/cancel"

    error = await failure(fake)

    assert "queue URL" in error.message
    assert fake.polls == []


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://localhost:{port}/files/x.png"])
async def test_an_image_url_on_a_foreign_host_is_never_fetched(fake: FakeFal, url: str) -> None:
    fake.image_url_override = url.format(port=port(fake))

    error = await failure(fake)

    assert "host we do not download from" in error.message
    assert fake.downloads == []


@pytest.mark.parametrize(("status", "retryable"), [(404, False), (503, True)])
async def test_download_failure_is_a_billed_upstream_error(fake: FakeFal, status: int, retryable: bool) -> None:
    fake.download_status = status

    error = await failure(fake)

    assert f"({status})" in error.message
    assert error.retryable is retryable
    assert error.failover is False  # the request ran: another route would bill it twice
    assert len(fake.downloads) == 1


async def test_cancelling_takes_the_requests_out_of_the_queue_and_leaks_nothing(fake: FakeFal) -> None:
    fake.queued_polls = 10_000
    before = asyncio.all_tasks()
    async with open_session() as http:
        adapter = Fal(Upstream(http, fake.base_url, "test-key", poll_interval=0.01))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await ask(adapter, pro(n=6))
        assert adapter.upstream.pool.slots.held == {}  # every slot given back
    assert asyncio.all_tasks() == before
    assert sorted(fake.cancels) == sorted(request.id for request in fake.requests)
    assert len(fake.cancels) == 2
    assert {auth for method, _, auth in fake.authorizations if method == "PUT"} == {"Key test-key"}
    assert fake.in_flight == 0
    await asyncio.sleep(0.05)  # polls already on the wire when we cancelled may still land
    polls = len(fake.polls)
    await asyncio.sleep(0.1)  # ten poll intervals: a leaked task would keep polling
    assert len(fake.polls) == polls


async def test_a_cancel_that_hangs_does_not_hold_up_the_cancellation(
    fake: FakeFal, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.queued_polls = 10_000
    fake.cancel_delay = 5.0
    monkeypatch.setattr("qubax.providers.polling.CANCEL_TIMEOUT", 0.1)
    async with open_session() as http:
        adapter = Fal(Upstream(http, fake.base_url, "test-key", poll_interval=0.01))
        task = asyncio.create_task(ask(adapter, pro()))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 2.5  # bounded by CANCEL_TIMEOUT, not by the 5 s cancel
        assert adapter.upstream.pool.slots.held == {}  # every slot given back
    assert len(fake.cancels) == 1


async def test_the_key_concurrency_cap_holds_for_the_life_of_each_request(fake: FakeFal) -> None:
    fake.queued_polls = 5
    async with open_session() as http, asyncio.timeout(10):
        adapter = Fal(Upstream(http, fake.base_url, "test-key", poll_interval=0.01, concurrency=2))
        job = Job(ULTRA, "a lighthouse", 2048, 2048, 1)
        results = await asyncio.gather(*(ask(adapter, job) for _ in range(3)))

    assert [len(images) for images in results] == [1, 1, 1]
    assert len(fake.submissions) == 3
    assert fake.peak == 2


# --- Kontext and Fill, and the official client ------------------------------------------------------------


def data_uri(width: int, height: int, mode: str = "RGB") -> str:
    out = io.BytesIO()
    Image.new(mode, (width, height)).save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


async def test_the_official_client_drives_the_fake_kontext_and_fill(
    fake: FakeFal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fal's own client (`fal-client`) against the fake: the queue as the real one runs it."""
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", fake.base_url + "/")
    client = fal_client.AsyncClient(key="test-key")
    kontext = await client.subscribe(
        "fal-ai/flux-pro/kontext",
        arguments={"prompt": "at night", "image_url": data_uri(300, 200), "num_images": 2, "aspect_ratio": "3:2"},
        interval=0.01,
    )
    assert [(image["width"], image["height"]) for image in kontext["images"]] == [(1248, 832)] * 2
    multi = await client.subscribe(
        "fal-ai/flux-pro/kontext/max/multi",
        arguments={"prompt": "together", "image_urls": [data_uri(64, 64), data_uri(32, 64)]},
        interval=0.01,
    )
    assert len(multi["images"]) == 1
    fill = await client.subscribe(
        "fal-ai/flux-pro/v1/fill",
        arguments={"prompt": "a door", "image_url": data_uri(256, 128), "mask_url": data_uri(256, 128, "L")},
        interval=0.01,
    )
    assert (fill["images"][0]["width"], fill["images"][0]["height"]) == (256, 128)
    with pytest.raises(fal_client.client.FalClientHTTPError) as caught:
        await client.subscribe("fal-ai/flux-pro/v1/fill", arguments={"prompt": "no image"}, interval=0.01)
    assert caught.value.status_code == 422


async def test_kontext_goes_to_the_app_for_its_number_of_images(fake: FakeFal) -> None:
    async with open_session() as http:
        fal = Fal(Upstream(http, fake.base_url, "test-key", poll_interval=0.01))
        request = pro().request()
        for count, app in ((0, "kontext/text-to-image"), (1, "kontext"), (2, "kontext/multi")):
            images = tuple(upload(64 + i, 64) for i in range(count))
            await fal.generate(dataclasses.replace(request, images=images), "fal-ai/flux-pro/kontext")
            assert fake.models[-1] == f"fal-ai/flux-pro/{app}"
    assert "image_url" in fake.submissions[1] and len(fake.submissions[2]["image_urls"]) == 2


def upload(width: int, height: int, mode: str = "RGB") -> InputImage:
    out = io.BytesIO()
    Image.new(mode, (width, height)).save(out, "PNG")
    out.seek(0)
    return InputImage(out, "a.png", "png", width, height, alpha=mode == "RGBA")


# --- FLUX.2 ------------------------------------------------------------------------------------------------


async def test_flux2_asks_one_image_a_request_with_its_size_and_edits_through_edit(fake: FakeFal) -> None:
    async with open_session() as http:
        fal = Fal(Upstream(http, fake.base_url, "test-key", poll_interval=0.01))
        request = Job("", "a fox", 1440, 816, 2, seed=3, safety_tolerance=6).request()
        images = await fal.generate(request, "fal-ai/flux-2-pro")
        edit = dataclasses.replace(request, n=1, images=(upload(64, 48), upload(32, 48)), steps=20, guidance=2.5)
        await fal.generate(edit, "fal-ai/flux-2-flex")
    assert fake.models == ["fal-ai/flux-2-pro", "fal-ai/flux-2-pro", "fal-ai/flux-2-flex/edit"]
    assert [Image.open(io.BytesIO(image.data)).size for image in images] == [(1440, 816)] * 2
    first, _, flex = fake.submissions
    assert "num_images" not in first  # fal's FLUX.2 makes one image a request
    assert (first["image_size"], first["seed"], first["safety_tolerance"]) == ({"width": 1440, "height": 816}, 3, "5")
    assert [decode_data_uri(uri).size for uri in flex["image_urls"]] == [(64, 48), (32, 48)]  # type: ignore[union-attr]
    assert (flex["num_inference_steps"], flex["guidance_scale"]) == (20, 2.5)


async def test_the_official_client_drives_the_fake_flux2(fake: FakeFal, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", fake.base_url + "/")
    client = fal_client.AsyncClient(key="test-key")
    made = await client.subscribe(
        "fal-ai/flux-2-max/edit",
        arguments={"prompt": "p", "image_urls": [data_uri(64, 64)], "image_size": {"width": 1024, "height": 512}},
        interval=0.01,
    )
    assert [(image["width"], image["height"]) for image in made["images"]] == [(1024, 512)]
    with pytest.raises(fal_client.client.FalClientHTTPError) as caught:  # no num_images on FLUX.2
        await client.subscribe("fal-ai/flux-2-pro", arguments={"prompt": "p", "num_images": 2}, interval=0.01)
    assert caught.value.status_code == 422
