"""Streamed answers (`stream: true`) through the official SDK, sync and async, for test and live keys."""

import asyncio
import base64
import io
import time
from collections.abc import Iterable
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from qubax.records import tables
from qubax.server.settings import Settings
from tests.stack import Stack, rows, running_stack
from tests.test_upstreams import picture


@pytest.fixture
def client(base_url: str, test_key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=test_key, base_url=base_url + "/v1", max_retries=0)


def size_of(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def test_a_streamed_generation_sends_each_image_as_completed(client: openai.OpenAI) -> None:
    events = list(client.images.generate(model="flux-1-schnell", prompt="a fox", n=3, size="512x256", stream=True))
    assert [event.type for event in events] == ["image_generation.completed"] * 3
    assert all(size_of(event.b64_json) == (512, 256) for event in events)
    # Each image labelled by its place (#1, #2, #3), as an unstreamed answer's are.
    unstreamed = client.images.generate(
        model="flux-1-schnell", prompt="a fox", n=3, size="512x256", response_format="b64_json"
    )
    assert {event.b64_json for event in events} == {image.b64_json for image in unstreamed.data or []}
    assert len({event.b64_json for event in events}) == 3
    first = events[0]
    assert (first.size, first.output_format, first.quality, first.background) == ("512x256", "png", "auto", "auto")
    assert first.usage.total_tokens == 0  # not billed by token


def test_a_test_key_sends_the_partial_images_of_a_gpt_image_model(client: openai.OpenAI) -> None:
    stream = client.images.generate(
        model="gpt-image-1.5", prompt="a fox", size="1024x1536", output_format="jpeg", partial_images=3, stream=True
    )
    events = list(stream)
    assert [(event.type, getattr(event, "partial_image_index", None)) for event in events] == [
        ("image_generation.partial_image", 0),
        ("image_generation.partial_image", 1),
        ("image_generation.partial_image", 2),
        ("image_generation.completed", None),
    ]
    pictures = [Image.open(io.BytesIO(base64.b64decode(event.b64_json))) for event in events]
    assert [(picture.format, picture.size) for picture in pictures] == [("JPEG", (1024, 1536))] * 4
    assert len({event.b64_json for event in events}) == 4  # coarse to fine, then the image


def test_a_streamed_edit_sends_image_edit_events(client: openai.OpenAI) -> None:
    stream = client.images.edit(
        model="flux-kontext-pro", image=("a.png", picture(300, 200)), prompt="at night", stream=True, partial_images=2
    )
    [event] = list(stream)
    assert event.type == "image_edit.completed" and size_of(event.b64_json) == (1248, 832)


def test_the_async_client_iterates_a_stream(base_url: str, test_key: str) -> None:
    async def run() -> list[str]:
        async with openai.AsyncOpenAI(api_key=test_key, base_url=base_url + "/v1", max_retries=0) as client:
            stream = await client.images.generate(
                model="gpt-image-1.5", prompt="a fox", n=2, quality="low", output_format="webp", stream=True
            )
            return [event.type + ":" + event.quality + ":" + event.output_format async for event in stream]

    assert asyncio.run(run()) == ["image_generation.completed:low:webp"] * 2


def test_the_async_client_iterates_a_streamed_edit(base_url: str, test_key: str) -> None:
    async def run() -> list[tuple[str, tuple[int, int]]]:
        async with openai.AsyncOpenAI(api_key=test_key, base_url=base_url + "/v1", max_retries=0) as client:
            stream = await client.images.edit(
                model="flux-1-fill-pro",
                image=("a.png", picture(64, 64, mode="RGBA")),  # transparent: the whole image is painted
                prompt="a window",
                size="512x512",
                n=2,
                stream=True,
            )
            return [(event.type, size_of(event.b64_json)) async for event in stream]

    assert asyncio.run(run()) == [("image_edit.completed", (512, 512))] * 2


@pytest.mark.parametrize(
    ("change", "param"),
    [({"response_format": "url"}, "response_format"), ({"partial_images": 4}, "partial_images")],
)
def test_bad_streamed_requests_are_400s_before_the_stream(
    client: openai.OpenAI, change: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="gpt-image-1.5", prompt="x", stream=True, **change)
    assert caught.value.param == param


def test_a_refusal_before_the_stream_is_an_ordinary_error(base_url: str) -> None:
    client = openai.OpenAI(api_key="qbx_live_wrong", base_url=base_url + "/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.images.generate(model="flux-1-schnell", prompt="x", stream=True)


def test_a_gpt_image_model_relays_the_upstream_partial_images(settings: Settings) -> None:
    with running_stack(settings) as stack:
        events = list(
            stack.live.images.generate(model="gpt-image-1.5", prompt="a red barn", partial_images=2, stream=True)
        )
        assert [(event.type, getattr(event, "partial_image_index", None)) for event in events] == [
            ("image_generation.partial_image", 0),
            ("image_generation.partial_image", 1),
            ("image_generation.completed", None),
        ]
        assert events[-1].usage.output_tokens > 0  # the upstream's token count, passed on
        assert stack.openai.requests[-1]["stream"] is True and stack.openai.requests[-1]["partial_images"] == 2
        [row] = rows(stack.settings, tables.Generation)
        assert (row.outcome, row.images, row.upstream) == ("ok", 1, "openai") and row.cost_micros > 0


def test_no_more_partial_images_are_relayed_than_asked(settings: Settings) -> None:
    with running_stack(settings) as stack:
        stack.openai.extra_partials = 2
        stream = stack.live.images.generate(model="gpt-image-1.5", prompt="a barn", partial_images=1, stream=True)
        assert [event.type for event in stream] == ["image_generation.partial_image", "image_generation.completed"]


def test_a_streamed_edit_relays_partial_images_from_the_edits_endpoint(settings: Settings) -> None:
    with running_stack(settings) as stack:
        stream = stack.live.images.edit(
            model="gpt-image-1-mini",
            image=[("a.png", picture(64, 64)), ("b.png", picture(64, 64))],
            mask=("m.png", picture(64, 64, mode="RGBA")),
            prompt="together",
            stream=True,
            partial_images=1,
        )
        assert [event.type for event in stream] == ["image_edit.partial_image", "image_edit.completed"]
        fields = stack.openai.edits[-1]["fields"]
        assert (fields["stream"], fields["partial_images"], fields["n"]) == ("true", "1", "1")


def test_the_usage_record_is_durable_before_the_last_event(settings: Settings) -> None:
    """When the client holds the last `completed` event, the ledger already has the request, billed."""
    with running_stack(settings) as stack:
        seen = []
        for event in stack.live.images.generate(model="flux-1.1-pro", prompt="p", n=2, stream=True):
            seen.append([(row.outcome, row.images) for row in rows(stack.settings, tables.Generation)])
            assert event.type == "image_generation.completed"
        assert seen[-1] == [("ok", 2)]


def test_the_first_image_arrives_before_the_last_is_done(settings: Settings) -> None:
    with running_stack(settings) as stack:
        stack.bfl.statuses_for = {0: ["Ready"], 1: ["Pending"] * 40 + ["Ready"]}
        stream = stack.live.images.generate(model="flux-1.1-pro", prompt="p", n=2, stream=True)
        first = next(iter(stream))
        assert first.type == "image_generation.completed"
        # The second image was still being made (its task may not even have reached BFL yet).
        assert len(stack.bfl.tasks) < 2 or stack.bfl.tasks[1].polls < 40
        assert len(list(stream)) == 1


def until_error(stream: Iterable[Any]) -> tuple[list[str], openai.APIError]:
    """The types of the events a stream sent before the error event the SDK raises."""
    types = []
    with pytest.raises(openai.APIError) as caught:
        for event in stream:
            types.append(event.type)
    return types, caught.value


def test_a_failure_after_the_stream_started_is_an_error_event(settings: Settings) -> None:
    with running_stack(settings) as stack:
        stack.openai.stream_error_after = 1
        stream = stack.live.images.generate(model="gpt-image-1.5", prompt="p", partial_images=3, stream=True)
        types, error = until_error(stream)
        assert types == ["image_generation.partial_image"]
        assert error.message == "OpenAI failed while streaming the image."
        assert error.body["type"] == "upstream_error"  # type: ignore[index]
        [row] = rows(stack.settings, tables.Generation)
        assert (row.outcome, row.images, row.cost_micros) == ("upstream_error", 0, 0)


def test_a_failed_image_among_several_is_an_error_after_those_sent(settings: Settings) -> None:
    """With n=2, an image sent before its sibling failed was delivered, and is billed; nothing more."""
    with running_stack(settings, providers=("bfl",)) as stack:
        stack.bfl.statuses_for = {0: ["Ready"], 1: ["Pending"] * 5 + ["Error"]}
        types, error = until_error(stack.live.images.generate(model="flux-1.1-pro", prompt="p", n=2, stream=True))
        assert types == ["image_generation.completed"]
        assert "failed to generate the image" in error.message
        [row] = rows(stack.settings, tables.Generation)
        assert (row.images, row.cost_micros) == (1, 40_000)


def test_a_client_leaving_a_stream_cancels_the_upstream_work(settings: Settings) -> None:
    with running_stack(settings, providers=("fal",)) as stack:
        stack.fal.queued_polls = 10_000  # never done
        url = stack.url + "/v1/images/generations"
        body = {"model": "flux-1-schnell", "prompt": "p", "stream": True}
        headers = {"authorization": f"Bearer {stack.live_key}"}
        with httpx.stream("POST", url, json=body, headers=headers, timeout=10) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            deadline = time.monotonic() + 5
            while not stack.fal.polls and time.monotonic() < deadline:
                time.sleep(0.02)
        deadline = time.monotonic() + 5
        while not stack.fal.cancels and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stack.fal.cancels == [stack.fal.requests[0].id]
        outcomes = wait_for_rows(stack)
        assert outcomes == [("client_disconnected", 0)]


def wait_for_rows(stack: Stack) -> list[tuple[str, int]]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = [(row.outcome, row.images) for row in rows(stack.settings, tables.Generation)]
        if found:
            return found
        time.sleep(0.05)
    return []


def test_a_quiet_stream_is_kept_alive(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qubax.pipeline.streaming.PING_SECONDS", 0.05)
    with running_stack(settings) as stack:
        stack.bfl.pending_polls = 20
        url = stack.url + "/v1/images/generations"
        headers = {"authorization": f"Bearer {stack.live_key}"}
        with httpx.stream(
            "POST", url, json={"model": "flux-1.1-pro", "prompt": "p", "stream": True}, headers=headers
        ) as r:
            text = r.read().decode()
        assert ": ping" in text and text.rstrip().endswith("}")
        assert text.count("event: image_generation.completed") == 1
