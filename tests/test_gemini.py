"""Google's Gemini image models (and the Imagen 4 names they answer) end to end: the official `openai`
SDK → our app → a fake Gemini API over loopback HTTP."""

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
from tests.fakes.google import FakeGoogle, inline_image
from tests.server import serve
from tests.stack import Stack, charged, picture, png, rows, running_stack

# A second route for the flash model, so that a test sees whether a failure moves the work on.
FAILOVER_CATALOG = """
[models."gemini-3.1-flash-image"]
routes = [{ provider = "google" }, { provider = "google", model = "gemini-3-pro-image" }]
"""


@pytest.fixture
def gemini() -> Iterator[tuple[FakeGoogle, str]]:
    fake = FakeGoogle()
    with serve(fake.app) as url:
        yield fake, url + "/v1beta"


@pytest.fixture
def google(gemini: tuple[FakeGoogle, str]) -> FakeGoogle:
    return gemini[0]


def start(settings: Settings, gemini: tuple[FakeGoogle, str], catalog: str | None = None) -> Any:
    settings.credentials["google"] = SecretStr("test-key")
    return running_stack(settings, catalog=catalog, providers=(), base_urls={"google": gemini[1]})


@pytest.fixture
def stack(settings: Settings, gemini: tuple[FakeGoogle, str]) -> Iterator[Stack]:
    with start(settings, gemini) as stack:
        yield stack


def attempts(stack: Stack) -> list[tuple[str, str, int, str]]:
    return [(a.upstream, a.upstream_model, a.images, a.outcome) for a in rows(stack.settings, tables.Attempt)]


def image_config(google: FakeGoogle) -> list[tuple[str, dict[str, str]]]:
    return [(model, body["generationConfig"]["imageConfig"]) for model, body in google.requests]


# What the fake counts (tests/fakes/google.py): a prompt's text as len // 4 + 1 tokens, an input image as
# 258; out, 1,120 image tokens at 1K and 2K (2,000 at 4K; 1,290 on 2.5 Flash) and 200 thinking tokens on
# the Gemini 3 models. The catalog's rates, per 1M tokens: 3.1 Flash $0.50 in, $60 image out, $3 text out;
# Pro $2, $120, $12; 2.5 Flash $0.30, $30.
FLASH_1K = 2 * 0.5 + 1120 * 60 + 200 * 3  # "a fox": 2 text tokens; in micros, as the ledger counts


def test_a_generation_at_the_exact_size_with_usage_and_token_cost(stack: Stack, google: FakeGoogle) -> None:
    raw = stack.live.images.with_raw_response.generate(
        model="nano-banana-2", prompt="a fox", size="1536x1024", response_format="b64_json"
    )
    response = raw.parse()

    assert raw.headers["x-qubax-route"] == "google"
    assert [picture(item.b64_json) for item in response.data or []] == [("PNG", (1536, 1024))]
    assert image_config(google) == [("gemini-3.1-flash-image", {"aspectRatio": "3:2", "imageSize": "2K"})]
    assert google.requests[0][1]["generationConfig"]["responseModalities"] == ["IMAGE"]
    assert response.usage is not None
    assert response.usage.model_dump() == {
        "input_tokens": 2,
        "output_tokens": 1320,
        "total_tokens": 1322,
        "input_tokens_details": {"text_tokens": 2, "image_tokens": 0},
        "output_tokens_details": {"image_tokens": 1120, "text_tokens": 200},
    }
    assert charged(stack) == [("google", "ok", 1, int(FLASH_1K))]


def test_pro_by_its_preview_name_answers_a_url_at_4k_priced_by_its_tokens(stack: Stack, google: FakeGoogle) -> None:
    response = stack.live.images.generate(model="gemini-3-pro-image-preview", prompt="a harbour", size="3840x2160")

    url = (response.data or [])[0].url
    assert url is not None
    assert Image.open(io.BytesIO(httpx.get(url).content)).size == (3840, 2160)
    assert image_config(google) == [("gemini-3-pro-image", {"aspectRatio": "16:9", "imageSize": "4K"})]
    assert charged(stack) == [("google", "ok", 1, 3 * 2 + 2000 * 120 + 200 * 12)]


def test_the_operators_rates_price_the_tokens(settings: Settings, gemini: tuple[FakeGoogle, str]) -> None:
    catalog = """
[models."gemini-3.1-flash-image"]
token_prices = { text_input = 1, image_input = 1, image_output = 50, text_output = 10 }
"""
    with start(settings, gemini, catalog) as stack:
        stack.live.images.generate(model="gemini-3.1-flash-image", prompt="a fox", size="1024x1024")

        assert charged(stack) == [("google", "ok", 1, 2 * 1 + 1120 * 50 + 200 * 10)]


def test_nano_banana_takes_no_image_size(stack: Stack, google: FakeGoogle) -> None:
    response = stack.live.images.generate(
        model="nano-banana", prompt="a fox", size="1280x960", response_format="b64_json"
    )

    assert picture((response.data or [])[0].b64_json) == ("PNG", (1280, 960))
    assert image_config(google) == [("gemini-2.5-flash-image", {"aspectRatio": "4:3"})]
    assert charged(stack) == [("google", "ok", 1, int(2 * 0.3 + 1290 * 30))]


def test_n_images_by_as_many_calls(stack: Stack, google: FakeGoogle) -> None:
    response = stack.live.images.generate(
        model="gemini-3.1-flash-image", prompt="a fox", n=3, size="1024x1024", response_format="b64_json"
    )

    assert len({item.b64_json for item in response.data or []}) == 3
    assert len(google.requests) == 3
    assert response.usage is not None and response.usage.output_tokens == 3 * 1320
    assert charged(stack) == [("google", "ok", 3, 3 * int(FLASH_1K))]


def test_the_async_client(stack: Stack, google: FakeGoogle) -> None:
    async def generate() -> openai.types.ImagesResponse:
        async with openai.AsyncOpenAI(api_key=stack.live_key, base_url=stack.url + "/v1", max_retries=0) as client:
            return await client.images.generate(
                model="gemini-3.1-flash-image", prompt="a fox", size="800x1200", response_format="b64_json"
            )

    response = asyncio.run(generate())

    assert picture((response.data or [])[0].b64_json) == ("PNG", (800, 1200))
    assert image_config(google) == [("gemini-3.1-flash-image", {"aspectRatio": "2:3", "imageSize": "1K"})]


def test_an_edit_of_one_image(stack: Stack, google: FakeGoogle) -> None:
    response = stack.live.images.edit(
        model="nano-banana-pro",
        image=("cat.png", png(300, 200)),
        prompt="make it snow",
        size="1280x960",
        response_format="b64_json",
    )

    assert picture((response.data or [])[0].b64_json) == ("PNG", (1280, 960))
    parts = google.requests[0][1]["contents"][0]["parts"]
    assert parts[0] == {"text": "make it snow"}
    assert [
        (found[0], found[1].size) for found in map(inline_image, (p["inlineData"] for p in parts[1:])) if found
    ] == [("image/png", (300, 200))]
    assert response.usage is not None and response.usage.input_tokens_details.image_tokens == 258


def test_an_edit_of_several_images_composes_them_in_order(stack: Stack, google: FakeGoogle) -> None:
    images = [(f"{i}.png", png(100 + i, 100, (i * 20, 0, 0))) for i in range(5)]

    stack.live.images.edit(model="gemini-3.1-flash-image", image=images, prompt="one poster of all of them")

    parts = google.requests[0][1]["contents"][0]["parts"][1:]
    found = [inline_image(part["inlineData"]) for part in parts]
    assert [(f[1].size, f[1].getpixel((0, 0))) for f in found if f] == [
        ((100 + i, 100), (i * 20, 0, 0)) for i in range(5)
    ]


def test_a_mask_is_refused_not_dropped(stack: Stack, google: FakeGoogle) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        stack.live.images.edit(
            model="gemini-3.1-flash-image", image=("a.png", png(64, 64)), mask=("m.png", png(64, 64)), prompt="p"
        )

    assert caught.value.param == "mask"
    assert google.requests == []


@pytest.mark.parametrize(
    "refusal", [{"block_reason": "PROHIBITED_CONTENT"}, {"finish_reason": "IMAGE_SAFETY"}, {"text_only": True}]
)
def test_a_safety_block_is_a_400_and_never_fails_over(
    settings: Settings, gemini: tuple[FakeGoogle, str], refusal: dict[str, Any]
) -> None:
    google = gemini[0]
    for name, value in refusal.items():
        setattr(google, name, value)
    with start(settings, gemini, FAILOVER_CATALOG) as stack:
        with pytest.raises(openai.BadRequestError) as caught:
            stack.live.images.generate(model="gemini-3.1-flash-image", prompt="something it refuses")

        assert caught.value.code == "content_policy_violation"
        assert [model for model, _ in google.requests] == ["gemini-3.1-flash-image"]  # not the second route
        assert [(g[1], g[3]) for g in charged(stack)] == [("content_policy_violation", 0)]


def test_an_upstream_failure_does_fail_over(settings: Settings, gemini: tuple[FakeGoogle, str]) -> None:
    google = gemini[0]
    with start(settings, gemini, FAILOVER_CATALOG) as stack:
        google.fail_status = 503
        with pytest.raises(openai.APIStatusError):  # both routes are the same failing fake
            stack.live.images.generate(model="gemini-3.1-flash-image", prompt="a fox")

        assert [model for model, _ in google.requests] == ["gemini-3.1-flash-image", "gemini-3-pro-image"]


@pytest.mark.parametrize(
    ("name", "stand_in"),
    [
        ("imagen-4", "gemini-3.1-flash-image"),
        ("imagen-4.0-fast-generate-001", "gemini-3.1-flash-image"),
        ("imagen-4-ultra", "gemini-3-pro-image"),
    ],
)
def test_imagen_names_are_answered_by_their_stand_in(
    stack: Stack, google: FakeGoogle, name: str, stand_in: str
) -> None:
    raw = stack.live.images.with_raw_response.generate(
        model=name, prompt="a fox", n=4, size="1024x1024", response_format="b64_json"
    )

    assert raw.headers["x-qubax-route"] == f"google:{stand_in}"
    assert [picture(item.b64_json) for item in raw.parse().data or []] == [("PNG", (1024, 1024))] * 4
    assert {model for model, _ in google.requests} == {stand_in}  # no call spent on the shut-down name
    thinking = {"imagen-4": {"thinkingLevel": "HIGH"}, "imagen-4.0-fast-generate-001": {"thinkingLevel": "MINIMAL"}}
    assert google.requests[0][1]["generationConfig"].get("thinkingConfig") == thinking.get(name)
    assert [(a[1], a[3]) for a in attempts(stack)][-1] == (stand_in, "ok")
    assert attempts(stack)[0][3] == "upstream_model_not_found"
    rates = (0.5, 60, 3) if "flash" in stand_in else (2, 120, 12)
    one = 2 * rates[0] + 1120 * rates[1] + 200 * rates[2]
    assert charged(stack) == [(f"google:{stand_in}", "ok", 4, 4 * int(one))]


def test_imagen_takes_at_most_four_images(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        stack.live.images.generate(model="imagen-4", prompt="a fox", n=5)

    assert caught.value.param == "n"


def test_an_imagen_edit_is_a_400_naming_model(stack: Stack, google: FakeGoogle) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        stack.live.images.edit(model="imagen-4", image=("a.png", png(64, 64)), prompt="p")

    assert caught.value.param == "model"
    assert google.requests == []


def test_a_streamed_generation(stack: Stack, google: FakeGoogle) -> None:
    events = list(
        stack.live.images.generate(model="gemini-3.1-flash-image", prompt="a fox", n=2, size="1280x720", stream=True)
    )

    assert [event.type for event in events] == ["image_generation.completed"] * 2
    assert [picture(event.b64_json)[1] for event in events] == [(1280, 720)] * 2  # type: ignore[union-attr]
    assert [event.usage.output_tokens for event in events] == [1320, 1320]  # type: ignore[union-attr]
    assert len(google.requests) == 2
    assert charged(stack) == [("google", "ok", 2, 2 * int(FLASH_1K))]


@pytest.mark.parametrize("which", ["live", "test"])
def test_a_stream_asking_for_partial_images_gets_none(stack: Stack, which: str) -> None:
    client = stack.live if which == "live" else stack.test
    events = list(
        client.images.generate(
            model="gemini-3-pro-image", prompt="a fox", size="1024x1024", stream=True, partial_images=2
        )
    )

    assert [event.type for event in events] == ["image_generation.completed"]  # as live, so with a test key


def test_a_job(stack: Stack, google: FakeGoogle) -> None:
    raw = stack.live.images.with_raw_response.generate(
        model="gemini-3.1-flash-image",
        prompt="a fox",
        response_format="b64_json",
        extra_headers={"Prefer": "respond-async"},
    )
    assert raw.status_code == 202
    job = wait_for(stack, raw.http_response.json()["id"])

    assert job["status"] == "succeeded"
    assert picture(job["result"]["data"][0]["b64_json"]) == ("PNG", (1024, 1024))
    assert len(google.requests) == 1
    assert charged(stack) == [("google", "ok", 1, int(FLASH_1K))]


def test_the_same_idempotency_key_is_made_and_charged_once(stack: Stack, google: FakeGoogle) -> None:
    fields: dict[str, Any] = {"model": "gemini-3.1-flash-image", "prompt": "a fox", "response_format": "b64_json"}
    headers = {"Idempotency-Key": "gemini-1"}

    first = stack.live.images.generate(**fields, extra_headers=headers)
    again = stack.live.images.with_raw_response.generate(**fields, extra_headers=headers)

    assert again.headers["x-qubax-idempotent-replayed"] == "true"
    assert (again.parse().data or [])[0].b64_json == (first.data or [])[0].b64_json
    assert len(google.requests) == 1
    assert charged(stack) == [("google", "ok", 1, int(FLASH_1K))]


def test_a_test_key_reaches_no_upstream_and_pays_nothing(stack: Stack, google: FakeGoogle) -> None:
    response = stack.test.images.generate(
        model="nano-banana-pro", prompt="a fox", size="2048x1152", response_format="b64_json"
    )
    edit = stack.test.images.edit(
        model="gemini-2.5-flash-image", image=("a.png", png(64, 64)), prompt="p", response_format="b64_json"
    )
    imagen = stack.test.images.generate(model="imagen-4-fast", prompt="a fox", response_format="b64_json")

    assert picture((response.data or [])[0].b64_json) == ("PNG", (2048, 1152))
    assert picture((edit.data or [])[0].b64_json)[0] == "PNG"
    assert picture((imagen.data or [])[0].b64_json) == ("PNG", (1024, 1024))
    assert google.requests == []
    assert [g[3] for g in charged(stack)] == [0, 0, 0]


def test_models_lists_the_gemini_and_imagen_names(stack: Stack) -> None:
    listed = {model.id for model in stack.live.models.list()}

    assert {"gemini-2.5-flash-image", "gemini-3.1-flash-image", "gemini-3-pro-image"} <= listed
    assert {"imagen-4.0-generate-001", "imagen-4.0-fast-generate-001", "imagen-4.0-ultra-generate-001"} <= listed
    assert "flux-1.1-pro" not in listed and "gpt-image-2" not in listed  # only Google is configured


def wait_for(stack: Stack, job_id: str, timeout: float = 20) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {stack.live_key}"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = httpx.get(f"{stack.url}/v1/images/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end")
