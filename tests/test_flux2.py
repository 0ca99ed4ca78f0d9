"""FLUX.2 end to end: the official `openai` SDK → our app → the fake BFL, fal and Replicate over loopback.

BFL serves flux-2-pro first, then fal, then Replicate; each image is a BFL task, billed by megapixel."""

import asyncio
import base64
import io
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from qubax.records import tables
from qubax.server.settings import Settings
from tests.fakes import decode_data_uri, decode_image
from tests.stack import Stack, rows, running_stack
from tests.test_jobs import ASYNC, wait_for
from tests.test_quota import limited_key
from tests.test_upstreams import picture

INPUTS = ("input_image", *(f"input_image_{i}" for i in range(2, 9)))


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    with running_stack(settings, providers=("bfl", "fal", "replicate")) as stack:
        yield stack


def size_of(b64: str | None) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64 or ""))).size


def charged(stack: Stack) -> list[tuple[str, int, int]]:
    return [(row.outcome, row.images, row.cost_micros) for row in rows(stack.settings, tables.Generation)]


def test_a_generation_is_made_by_bfl_at_the_size_asked_and_billed_by_megapixel(stack: Stack) -> None:
    raw = stack.live.images.with_raw_response.generate(
        model="flux-2-pro", prompt="a fox", size="1440x816", n=2, extra_body={"seed": 5, "safety_tolerance": 3}
    )
    assert raw.headers["x-qubax-route"] == "bfl"
    response = raw.parse()
    assert [Image.open(io.BytesIO(httpx.get(item.url or "").content)).size for item in response.data] == [
        (1440, 816)
    ] * 2
    assert len(stack.bfl.submissions) == 2  # one task per image
    sent = stack.bfl.submissions[0]
    assert (sent["width"], sent["height"], sent["seed"], sent["safety_tolerance"]) == (1440, 816, 5, 3)
    # 1440x816 is 1.12 megapixels of 1024x1024, counted as 2: $0.03 + $0.015 an image.
    assert charged(stack) == [("ok", 2, 2 * 45_000)]


def test_a_bigger_image_costs_more(stack: Stack) -> None:
    for size in ("1024x1024", "2048x1024", "2048x2048"):
        made = stack.live.images.generate(model="flux-2-max", prompt="p", size=size, response_format="b64_json")
        assert "x".join(map(str, size_of(made.data[0].b64_json))) == size
    # $0.07 the first megapixel, $0.03 each further one.
    assert [cost for _, _, cost in charged(stack)] == [70_000, 100_000, 160_000]


def test_sizes_outside_flux2_limits_are_a_400_naming_size(stack: Stack) -> None:
    for size in ("1000x1000", "4096x1024", "128x128"):
        with pytest.raises(openai.BadRequestError) as caught:
            stack.live.images.generate(model="flux-2-pro", prompt="p", size=size)
        assert (caught.value.status_code, caught.value.param) == (400, "size")


def test_the_async_client_gets_b64_json(stack: Stack) -> None:
    async def run() -> list[tuple[int, int]]:
        async with openai.AsyncOpenAI(api_key=stack.live.api_key, base_url=f"{stack.url}/v1", max_retries=0) as sdk:
            made = await sdk.images.generate(
                model="flux-2-flex", prompt="p", size="768x1344", n=2, response_format="b64_json"
            )
            return [size_of(item.b64_json) for item in made.data]

    assert asyncio.run(run()) == [(768, 1344)] * 2


def test_flex_takes_steps_and_guidance_the_others_refuse_them(stack: Stack) -> None:
    stack.live.images.generate(model="flux-2-flex", prompt="p", extra_body={"steps": 12, "guidance": 6.5})
    assert (stack.bfl.submissions[-1]["steps"], stack.bfl.submissions[-1]["guidance"]) == (12, 6.5)
    for model, field in (("flux-2-pro", "steps"), ("flux-1.1-pro", "guidance"), ("dall-e-3", "steps")):
        with pytest.raises(openai.BadRequestError) as caught:
            stack.live.images.generate(model=model, prompt="p", extra_body={field: 10})
        assert caught.value.param == field and "FLUX extension" in caught.value.message
    for field, value in (("steps", 51), ("guidance", 1), ("guidance", "high")):
        with pytest.raises(openai.BadRequestError) as caught:
            stack.live.images.generate(model="flux-2-flex", prompt="p", extra_body={field: value})
        assert caught.value.param == field
    assert len(stack.bfl.submissions) == 1


def test_an_edit_sends_every_image_and_bills_their_megapixels(stack: Stack) -> None:
    images = [("a.png", picture(300 + i, 200)) for i in range(8)]
    made = stack.live.images.edit(
        model="flux-2-pro", image=images, prompt="all together", size="1024x1024", response_format="b64_json"
    )
    assert size_of(made.data[0].b64_json) == (1024, 1024)
    sent = stack.bfl.submissions[-1]
    assert [decode_image(sent[name]).size for name in INPUTS] == [(300 + i, 200) for i in range(8)]  # type: ignore[union-attr]
    # $0.03 for the output's one megapixel, $0.015 for each input image's.
    assert charged(stack) == [("ok", 1, 30_000 + 8 * 15_000)]


def test_an_edit_without_a_size_takes_the_image_s_aspect_ratio(stack: Stack) -> None:
    made = stack.live.images.edit(
        model="flux-2-pro", image=("a.png", picture(300, 200)), prompt="at night", response_format="b64_json"
    )
    assert size_of(made.data[0].b64_json) == (1248, 832)
    assert (stack.bfl.submissions[-1]["width"], stack.bfl.submissions[-1]["height"]) == (1248, 832)


def test_a_mask_is_refused_and_too_many_images_too(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        stack.live.images.edit(
            model="flux-2-pro",
            image=("a.png", picture(64, 64)),
            mask=("m.png", picture(64, 64, mode="RGBA")),
            prompt="p",
        )
    assert (caught.value.status_code, caught.value.param) == (400, "mask")
    nine = [("a.png", picture(64, 64))] * 9
    with pytest.raises(openai.BadRequestError) as caught:
        stack.live.images.edit(model="flux-2-pro", image=nine, prompt="p")
    assert caught.value.param == "image"
    with pytest.raises(openai.BadRequestError) as caught:
        stack.live.images.edit(model="flux-2-klein-4b", image=nine[:5], prompt="p")
    assert caught.value.param == "image"
    assert stack.bfl.submissions == []


def test_failover_goes_from_bfl_to_fal_to_replicate(stack: Stack) -> None:
    stack.bfl.submit_status = 503
    raw = stack.live.images.with_raw_response.edit(
        model="flux-2-flex", image=[("a.png", picture(64, 48)), ("b.png", picture(32, 48))], prompt="p",
        size="1440x816", extra_body={"steps": 20},
    )  # fmt: skip
    assert raw.headers["x-qubax-route"] == "fal"
    assert stack.fal.models == ["fal-ai/flux-2-flex/edit"]
    sent: dict[str, Any] = stack.fal.submissions[-1]
    assert [decode_data_uri(uri).size for uri in sent["image_urls"]] == [(64, 48), (32, 48)]  # type: ignore[union-attr]
    assert (sent["image_size"], sent["num_inference_steps"]) == ({"width": 1440, "height": 816}, 20)
    stack.fal.submit_status = 500
    raw = stack.live.images.with_raw_response.generate(model="flux-2-pro", prompt="p", size="1440x816", n=2)
    assert raw.headers["x-qubax-route"] == "replicate"
    assert len(raw.parse().data) == 2
    inputs = [prediction.input for prediction in stack.replicate.predictions]
    assert [(i["aspect_ratio"], i["width"], i["height"]) for i in inputs] == [("custom", 1440, 816)] * 2
    # Billed the model's megapixel price whichever host made the images.
    assert charged(stack)[-1] == ("ok", 2, 2 * 45_000)


def test_klein_is_served_by_bfl_alone(stack: Stack) -> None:
    stack.bfl.submit_status = 503
    with pytest.raises(openai.APIStatusError):
        stack.live.images.generate(model="flux-2-klein-9b", prompt="p")
    assert stack.fal.submissions == [] and stack.replicate.predictions == []


def test_a_streamed_generation_and_edit(stack: Stack) -> None:
    events = list(stack.live.images.generate(model="flux-2-pro", prompt="p", size="1024x768", n=2, stream=True))
    assert [event.type for event in events] == ["image_generation.completed"] * 2
    assert all(size_of(event.b64_json) == (1024, 768) for event in events)
    edited = list(
        stack.live.images.edit(model="flux-2-max", image=("a.png", picture(300, 200)), prompt="p", stream=True)
    )
    assert [event.type for event in edited] == ["image_edit.completed"]
    assert len(stack.bfl.submissions) == 3


def test_a_job_and_an_idempotent_request(stack: Stack) -> None:
    fields: dict[str, Any] = {"model": "flux-2-pro", "prompt": "p", "size": "2048x1024", "response_format": "b64_json"}
    raw = stack.live.images.with_raw_response.generate(**fields, extra_headers=ASYNC)
    assert raw.status_code == 202
    done = wait_for(stack.live, raw.http_response.json()["id"])
    assert done["status"] == "succeeded" and size_of(done["result"]["data"][0]["b64_json"]) == (2048, 1024)
    headers = {"Idempotency-Key": "flux2-once"}
    first = stack.live.images.generate(**fields, extra_headers=headers)
    again = stack.live.images.generate(**fields, extra_headers=headers)
    assert first.data[0].b64_json == again.data[0].b64_json
    assert len(stack.bfl.submissions) == 2
    assert charged(stack) == [("ok", 1, 45_000)] * 2


def test_a_budget_is_checked_with_the_megapixel_price(stack: Stack) -> None:
    sdk = limited_key(stack, "--monthly-budget-usd", "0.1")
    sdk.images.generate(model="flux-2-pro", prompt="p", size="2048x1024")  # $0.045
    with pytest.raises(openai.RateLimitError) as caught:  # $0.075 more would pass the budget
        sdk.images.generate(model="flux-2-pro", prompt="p", size="2048x2048")
    assert caught.value.code == "insufficient_quota"
    sdk.images.generate(model="flux-2-pro", prompt="p", size="1024x1024")  # $0.03 still fits
    assert len(stack.bfl.submissions) == 2


def test_test_keys_make_flux2_images_without_an_upstream(stack: Stack) -> None:
    made = stack.test.images.generate(model="flux-2-flex", prompt="p", size="1440x816", response_format="b64_json")
    assert size_of(made.data[0].b64_json) == (1440, 816)
    edited = stack.test.images.edit(
        model="flux-2-klein-4b", image=[("a.png", picture(300, 200))] * 2, prompt="p", response_format="b64_json"
    )
    assert size_of(edited.data[0].b64_json) == (1248, 832)
    assert stack.bfl.submissions == [] and charged(stack) == [("ok", 1, 0), ("ok", 1, 0)]
