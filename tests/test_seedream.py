"""Seedream 4.0 and 4.5 end to end: the official `openai` SDK → our app → a fake BytePlus ModelArk (and
fake fal and Replicate, where the request fails over) over loopback HTTP."""

import asyncio
import io
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from pydantic import SecretStr

from qubax.records import tables
from qubax.server.settings import Settings
from tests.fakes import decode_data_uri
from tests.fakes.byteplus import FakeModelArk
from tests.server import serve
from tests.stack import Stack, charged, picture, png, rows, running_stack

SEEDREAM_4 = "seedream-4-0-250828"


@pytest.fixture
def modelark() -> Iterator[tuple[FakeModelArk, str]]:
    fake = FakeModelArk()
    with serve(fake.app) as url:
        yield fake, url + "/api/v3"


@pytest.fixture
def ark(modelark: tuple[FakeModelArk, str]) -> FakeModelArk:
    return modelark[0]


@pytest.fixture
def stack(settings: Settings, modelark: tuple[FakeModelArk, str]) -> Iterator[Stack]:
    """ModelArk first, then fal, then Replicate: the catalog's order for Seedream."""
    settings.credentials["byteplus"] = SecretStr("test-key")
    with running_stack(settings, providers=("fal", "replicate"), base_urls={"byteplus": modelark[1]}) as stack:
        yield stack


def attempts(stack: Stack) -> list[tuple[str, int, str]]:
    return [(a.upstream, a.images, a.outcome) for a in rows(stack.settings, tables.Attempt)]


def test_a_generation_is_made_by_modelark_at_the_exact_size_and_billed_per_image(
    stack: Stack, ark: FakeModelArk
) -> None:
    raw = stack.live.images.with_raw_response.generate(
        model="seedream-4.0", prompt="a red kite", n=2, size="1600x600", response_format="b64_json"
    )
    response = raw.parse()

    assert raw.headers["x-qubax-route"] == "byteplus"
    assert [picture(item.b64_json) for item in response.data or []] == [("PNG", (1600, 600))] * 2
    assert [body["size"] for body in ark.requests] == ["1600x600"] * 2
    assert {(body["model"], body["watermark"], body["sequential_image_generation"]) for body in ark.requests} == {
        (SEEDREAM_4, False, "disabled")
    }
    assert charged(stack) == [("byteplus", "ok", 2, 60_000)]  # $0.03 an image
    assert stack.fal.submissions == [] and stack.replicate.creates == []


def test_seedream_4_5_answers_a_url_and_costs_its_own_price(stack: Stack, ark: FakeModelArk) -> None:
    response = stack.live.images.generate(model="seedream-4.5", prompt="a harbour", size="2560x1440")

    url = (response.data or [])[0].url
    assert url is not None
    download = httpx.get(url)
    assert Image.open(io.BytesIO(download.content)).size == (2560, 1440)
    assert ark.requests[0]["model"] == "seedream-4-5-251128"
    assert charged(stack) == [("byteplus", "ok", 1, 40_000)]


def test_the_async_client_gets_the_same(stack: Stack, ark: FakeModelArk) -> None:
    async def generate() -> openai.types.ImagesResponse:
        async with openai.AsyncOpenAI(api_key=stack.live_key, base_url=stack.url + "/v1", max_retries=0) as client:
            return await client.images.generate(
                model="seedream-4.0", prompt="a fox", size="1024x1024", response_format="b64_json"
            )

    response = asyncio.run(generate())

    assert picture((response.data or [])[0].b64_json) == ("PNG", (1024, 1024))
    assert ark.requests[0]["size"] == "1024x1024"


def test_the_watermark_is_sent_only_when_asked(stack: Stack, ark: FakeModelArk) -> None:
    stack.live.images.generate(model="seedream-4.0", prompt="a fox", extra_body={"watermark": True})
    stack.live.images.generate(model="seedream-4.0", prompt="a fox", extra_body={"watermark": False})

    assert [body["watermark"] for body in ark.requests] == [True, False]


def test_an_edit_takes_the_watermark_as_a_form_field(stack: Stack, ark: FakeModelArk) -> None:
    stack.live.images.edit(
        model="seedream-4.0", image=("a.png", png(64, 64)), prompt="p", extra_body={"watermark": True}
    )
    stack.live.images.edit(model="seedream-4.0", image=("a.png", png(64, 64)), prompt="p")

    assert [body["watermark"] for body in ark.requests] == [True, False]


def test_the_watermark_extension_is_refused_for_models_without_it(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        stack.test.images.generate(model="flux-1.1-pro", prompt="a fox", extra_body={"watermark": False})

    assert caught.value.param == "watermark"


@pytest.mark.parametrize(
    ("model", "size"),
    [("seedream-4.5", "1024x1024"), ("seedream-4.0", "800x800"), ("seedream-4.0", "4096x200")],
)
def test_a_size_modelark_cannot_make_is_a_400_naming_size(stack: Stack, model: str, size: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        stack.live.images.generate(model=model, prompt="a fox", size=size)  # type: ignore[arg-type]

    assert (caught.value.param, caught.value.code) == ("size", "invalid_size")
    assert "3,686,400" in caught.value.message if model == "seedream-4.5" else "921,600" in caught.value.message


def test_the_seed_extension_is_not_seedream_s(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        stack.live.images.generate(model="seedream-4.0", prompt="a fox", extra_body={"seed": 3})

    assert caught.value.param == "seed"


def test_an_edit_of_one_image_sends_it_as_the_reference(stack: Stack, ark: FakeModelArk) -> None:
    response = stack.live.images.edit(
        model="seedream-4.0",
        image=("cat.png", png(300, 200)),
        prompt="make it snow",
        size="1280x960",
        response_format="b64_json",
    )

    assert picture((response.data or [])[0].b64_json) == ("PNG", (1280, 960))
    reference = decode_data_uri(ark.requests[0]["image"])
    assert reference is not None and reference.size == (300, 200)
    assert ark.requests[0]["size"] == "1280x960"
    assert charged(stack) == [("byteplus", "ok", 1, 30_000)]


def test_an_edit_of_several_images_sends_them_all_in_order(stack: Stack, ark: FakeModelArk) -> None:
    images = [(f"{i}.png", png(100 + i, 100)) for i in range(10)]

    stack.live.images.edit(model="seedream-4.5", image=images, prompt="one poster of all of them")

    assert [decode_data_uri(uri).size for uri in ark.requests[0]["image"]] == [(100 + i, 100) for i in range(10)]  # type: ignore[union-attr]


def test_more_than_ten_images_is_a_400_naming_image(stack: Stack, ark: FakeModelArk) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        stack.live.images.edit(model="seedream-4.0", image=[("a.png", png(64, 64))] * 11, prompt="p")

    assert caught.value.param == "image"
    assert ark.requests == []


def test_a_mask_is_refused_not_dropped(stack: Stack, ark: FakeModelArk) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        stack.live.images.edit(
            model="seedream-4.0", image=("a.png", png(64, 64)), mask=("m.png", png(64, 64)), prompt="p"
        )

    assert caught.value.param == "mask"
    assert ark.requests == []


def test_a_content_refusal_is_a_400_and_never_fails_over(stack: Stack, ark: FakeModelArk) -> None:
    ark.refuse = "InputTextSensitiveContentDetected"

    with pytest.raises(openai.BadRequestError) as caught:
        stack.live.images.generate(model="seedream-4.0", prompt="something it refuses")

    assert caught.value.code == "content_policy_violation"
    assert stack.fal.submissions == [] and stack.replicate.creates == []
    assert attempts(stack) == [("byteplus", 0, "content_policy_violation")]
    assert [(g[1], g[3]) for g in charged(stack)] == [("content_policy_violation", 0)]


def test_modelark_failing_hands_the_work_to_fal(stack: Stack, ark: FakeModelArk) -> None:
    ark.fail_status = 503

    raw = stack.live.images.with_raw_response.generate(
        model="seedream-4.0", prompt="a fox", n=2, size="1600x1200", response_format="b64_json"
    )

    assert raw.headers["x-qubax-route"] == "fal"
    assert [picture(item.b64_json) for item in raw.parse().data or []] == [("PNG", (1600, 1200))] * 2
    assert stack.fal.models == ["fal-ai/bytedance/seedream/v4/text-to-image"]
    assert stack.fal.submissions[0]["image_size"] == {"width": 1600, "height": 1200}
    assert stack.fal.submissions[0]["num_images"] == 2
    assert charged(stack) == [("fal", "ok", 2, 60_000)]


def test_an_edit_failing_over_goes_to_fal_s_edit_app_with_every_image(stack: Stack, ark: FakeModelArk) -> None:
    ark.fail_status = 500

    stack.live.images.edit(model="seedream-4.5", image=[("a.png", png(80, 60)), ("b.png", png(60, 80))], prompt="p")

    assert stack.fal.models == ["fal-ai/bytedance/seedream/v4.5/edit"]
    assert [decode_data_uri(uri).size for uri in stack.fal.submissions[0]["image_urls"]] == [(80, 60), (60, 80)]  # type: ignore[union-attr]


def test_when_modelark_and_fal_fail_replicate_makes_it(stack: Stack, ark: FakeModelArk) -> None:
    ark.fail_status, stack.fal.submit_status = 500, 503

    raw = stack.live.images.with_raw_response.edit(
        model="seedream-4.0", image=("a.png", png(90, 60)), prompt="p", size="1536x1024", response_format="b64_json"
    )

    assert raw.headers["x-qubax-route"] == "replicate"
    assert picture((raw.parse().data or [])[0].b64_json) == ("PNG", (1536, 1024))
    sent = stack.replicate.creates[0]["input"]
    assert (sent["size"], sent["width"], sent["height"], sent["max_images"]) == ("custom", 1536, 1024, 1)
    assert decode_data_uri(sent["image_input"][0]).size == (90, 60)  # type: ignore[union-attr]
    assert [a[0] for a in attempts(stack)] == ["byteplus", "fal", "replicate"]
    assert charged(stack) == [("replicate", "ok", 1, 30_000)]


def test_a_size_replicate_cannot_make_is_asked_by_aspect_ratio_and_fitted(stack: Stack, ark: FakeModelArk) -> None:
    ark.fail_status, stack.fal.submit_status = 500, 503

    response = stack.live.images.generate(
        model="seedream-4.0", prompt="a fox", size="1280x720", response_format="b64_json"
    )

    assert picture((response.data or [])[0].b64_json) == ("PNG", (1280, 720))
    sent = stack.replicate.creates[0]["input"]
    assert (sent["size"], sent["aspect_ratio"]) == ("2K", "16:9")
    assert "width" not in sent


def test_a_streamed_generation(stack: Stack, ark: FakeModelArk) -> None:
    events = list(stack.live.images.generate(model="seedream-4.0", prompt="a fox", n=2, size="1200x900", stream=True))

    assert [event.type for event in events] == ["image_generation.completed"] * 2
    assert [picture(event.b64_json)[1] for event in events] == [(1200, 900)] * 2
    assert len(ark.requests) == 2


def test_a_job_is_made_by_modelark(stack: Stack, ark: FakeModelArk) -> None:
    raw = stack.live.images.with_raw_response.generate(
        model="seedream-4.0", prompt="a fox", response_format="b64_json", extra_headers={"Prefer": "respond-async"}
    )
    assert raw.status_code == 202
    job = wait_for(stack, raw.http_response.json()["id"])

    assert job["status"] == "succeeded"
    assert picture(job["result"]["data"][0]["b64_json"]) == ("PNG", (2048, 2048))
    assert len(ark.requests) == 1
    assert charged(stack) == [("byteplus", "ok", 1, 30_000)]


def test_the_same_idempotency_key_is_made_and_charged_once(stack: Stack, ark: FakeModelArk) -> None:
    fields: dict[str, Any] = {"model": "seedream-4.0", "prompt": "a fox", "response_format": "b64_json"}
    headers = {"Idempotency-Key": "seedream-1"}

    first = stack.live.images.generate(**fields, extra_headers=headers)
    again = stack.live.images.with_raw_response.generate(**fields, extra_headers=headers)

    assert again.headers["x-qubax-idempotent-replayed"] == "true"
    assert (again.parse().data or [])[0].b64_json == (first.data or [])[0].b64_json
    assert len(ark.requests) == 1
    assert charged(stack) == [("byteplus", "ok", 1, 30_000)]


def test_a_test_key_reaches_no_upstream_and_pays_nothing(stack: Stack, ark: FakeModelArk) -> None:
    response = stack.test.images.generate(
        model="seedream-4.5", prompt="a fox", size="3000x1500", response_format="b64_json"
    )
    edit = stack.test.images.edit(
        model="seedream-4.0", image=("a.png", png(64, 64)), prompt="p", response_format="b64_json"
    )

    assert picture((response.data or [])[0].b64_json) == ("PNG", (3000, 1500))
    assert picture((edit.data or [])[0].b64_json) == ("PNG", (2048, 2048))
    assert ark.requests == []
    assert [g[3] for g in charged(stack)] == [0, 0]


def test_models_lists_seedream_where_a_provider_serves_it(stack: Stack) -> None:
    listed = {model.id for model in stack.live.models.list()}

    assert {"seedream-4.0", "seedream-4.5"} <= listed


def test_models_leaves_seedream_out_where_no_provider_serves_it(settings: Settings) -> None:
    with running_stack(settings, providers=("bfl",)) as stack:
        listed = {model.id for model in stack.live.models.list()}

    assert "flux-1.1-pro" in listed and not {"seedream-4.0", "seedream-4.5"} & listed


def wait_for(stack: Stack, job_id: str, timeout: float = 20) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {stack.live_key}"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = httpx.get(f"{stack.url}/v1/images/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end")
