"""Live keys end to end: the official SDK → our app → fake upstreams, all over real loopback HTTP."""

import base64
import io
import random
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from pydantic import SecretStr

from qubax.app import create_app
from qubax.records import tables
from qubax.server.settings import Settings
from tests.catalog import MODELS
from tests.conftest import create_key
from tests.fakes.bfl import FakeBFL
from tests.server import serve
from tests.stack import Stack, client, rows, running_stack


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    with running_stack(settings) as stack:
        yield stack


def picture(width: int, height: int, kind: str = "PNG", mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height)).save(out, kind)
    return out.getvalue()


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def generations(settings: Settings) -> list[tables.Generation]:
    return rows(settings, tables.Generation)


def attempts(settings: Settings) -> list[tables.Attempt]:
    return rows(settings, tables.Attempt)


@pytest.mark.parametrize(
    ("model", "size", "n", "route"),
    [
        ("flux-1.1-pro", "1024x1024", 3, "bfl"),
        ("flux-1.1-pro-ultra", "2752x1536", 2, "bfl"),
        ("flux-1-schnell", "512x768", 4, "together"),
        ("dall-e-3", "1792x1024", 1, "openai"),
    ],
)
def test_every_model_through_its_upstream(stack: Stack, model: str, size: str, n: int, route: str) -> None:
    raw = stack.live.images.with_raw_response.generate(model=model, prompt="a red barn", n=n, size=size)
    assert raw.headers["x-qubax-route"] == route
    assert "x-qubax-test" not in raw.headers
    response = raw.parse()
    assert len(response.data) == n
    width, height = (int(side) for side in size.split("x"))
    for item in response.data:
        assert item.url is not None
        assert png(httpx.get(item.url).content).size == (width, height)
    [row] = generations(stack.settings)
    price = {"flux-1.1-pro": 40_000, "flux-1.1-pro-ultra": 60_000, "flux-1-schnell": 3_000, "dall-e-3": 80_000}
    assert (row.model, row.upstream, row.n, row.images, row.outcome) == (model, route, n, n, "ok")
    assert row.cost_micros == price[model] * n


def test_bfl_gets_one_task_per_image_and_jpeg_becomes_png(stack: Stack) -> None:
    response = stack.live.images.generate(
        model="flux-1.1-pro", prompt="fox", n=2, size="768x512", response_format="b64_json"
    )
    assert [(body["width"], body["height"], body["prompt"]) for body in stack.bfl.submissions] == [
        (768, 512, "fox")
    ] * 2
    images = [png(base64.b64decode(item.b64_json or "")) for item in response.data]
    assert [image.size for image in images] == [(768, 512)] * 2


def test_webp_output_and_ultra_aspect_ratio(stack: Stack) -> None:
    stack.bfl.image_format = "WEBP"
    response = stack.live.images.generate(
        model="flux-1.1-pro-ultra", prompt="x", size="1344x3136", response_format="b64_json"
    )
    assert stack.bfl.submissions[0]["aspect_ratio"] == "9:21"
    assert "width" not in stack.bfl.submissions[0]
    assert png(base64.b64decode(response.data[0].b64_json or "")).size == (1344, 3136)


def test_dalle_options_and_revised_prompt(stack: Stack) -> None:
    response = stack.live.images.generate(
        model="dall-e-3", prompt="a cat", quality="hd", style="natural", response_format="b64_json"
    )
    body = stack.openai.requests[0]
    assert (body["model"], body["size"], body["quality"], body["style"]) == ("dall-e-3", "1024x1024", "hd", "natural")
    assert response.data[0].revised_prompt
    assert [row.cost_micros for row in generations(stack.settings)] == [80_000]


def test_test_keys_never_reach_an_upstream(stack: Stack) -> None:
    for model in ("flux-1.1-pro", "flux-1.1-pro-ultra", "flux-1-schnell", "dall-e-3"):
        stack.test.images.generate(model=model, prompt="p", response_format="b64_json")
    assert stack.bfl.submissions == stack.together.requests == stack.openai.requests == []
    rows = generations(stack.settings)
    assert [(row.upstream, row.cost_micros) for row in rows] == [("test", 0)] * 4


def test_moderation_is_a_content_policy_violation(stack: Stack) -> None:
    stack.bfl.moderate = "Request Moderated"
    with pytest.raises(openai.BadRequestError) as caught:
        stack.live.images.generate(model="flux-1.1-pro", prompt="p")
    assert (caught.value.code, caught.value.type) == ("content_policy_violation", "invalid_request_error")
    stack.together.moderate = True
    with pytest.raises(openai.BadRequestError) as caught:
        stack.live.images.generate(model="flux-1-schnell", prompt="p")
    assert caught.value.code == "content_policy_violation"
    assert [(row.outcome, row.cost_micros) for row in generations(stack.settings)] == [
        ("content_policy_violation", 0),
        ("content_policy_violation", 0),
    ]


def test_upstream_garbage_is_502_and_the_sdk_does_not_retry(stack: Stack) -> None:
    stack.together.garbage = True
    patient = client(stack.url, create_key(stack.settings), retries=2)
    with pytest.raises(openai.InternalServerError) as caught:
        patient.images.generate(model="flux-1-schnell", prompt="p")
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_error"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(stack.together.requests) == 1  # x-should-retry: false stopped the SDK's two retries


def test_busy_upstream_is_502_worth_retrying(stack: Stack) -> None:
    stack.openai.fail_status = 503
    with pytest.raises(openai.InternalServerError) as caught:
        stack.live.images.generate(model="dall-e-3", prompt="p")
    assert caught.value.response.headers["x-should-retry"] == "true"


def test_partial_fan_out_failure_is_made_up_by_the_next_route(stack: Stack) -> None:
    stack.bfl.statuses_for = {1: ["Pending", "Error"]}
    raw = stack.live.images.with_raw_response.generate(model="flux-1.1-pro", prompt="p", n=3, size="512x512")
    assert raw.headers["x-qubax-route"] == "bfl+together"
    assert len(raw.parse().data) == 3
    assert len(stack.bfl.submissions) == 3
    assert [body["n"] for body in stack.together.requests] == [1]  # only the missing image
    [row] = generations(stack.settings)
    assert (row.n, row.images, row.cost_micros, row.upstream) == (3, 3, 120_000, "bfl+together")
    assert [(a.upstream, a.n, a.images, a.outcome) for a in attempts(stack.settings)] == [
        ("bfl", 3, 2, "upstream_error"),
        ("together", 1, 1, "ok"),
    ]


def test_deadline_is_504(settings: Settings) -> None:
    settings.request_timeout_seconds = 0.5
    bfl = FakeBFL(pending_polls=10_000)
    with serve(bfl.app) as bfl_url:
        settings.base_urls["bfl"], settings.credentials["bfl"] = bfl_url, SecretStr("test-key")
        key = create_key(settings)
        with serve(create_app(settings)) as url, pytest.raises(openai.APIStatusError) as caught:
            client(url, key, retries=2).images.generate(model="flux-1.1-pro", prompt="p")
    assert caught.value.status_code == 504
    assert caught.value.code == "upstream_timeout"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(bfl.submissions) == 1
    assert [(row.outcome, row.cost_micros) for row in generations(settings)] == [("upstream_timeout", 0)]


def test_a_slow_generation_does_not_hold_up_others(stack: Stack) -> None:
    stack.openai.delay = 3.0
    slow = threading.Thread(target=lambda: stack.live.images.generate(model="dall-e-3", prompt="slow"))
    slow.start()
    while stack.openai.in_flight == 0:
        threading.Event().wait(0.01)
    quick = stack.live.images.generate(model="flux-1-schnell", prompt="quick", n=4, response_format="b64_json")
    assert len(quick.data) == 4
    assert stack.openai.in_flight == 1  # finished while the slow one was still generating
    slow.join()


@pytest.mark.parametrize(("output_format", "pillow"), [("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_output_format_and_flux_extras(stack: Stack, output_format: str, pillow: str) -> None:
    extras = {"seed": 42, "safety_tolerance": 5, "output_format": output_format}
    response = stack.live.images.generate(model="flux-1.1-pro", prompt="p", size="512x512", extra_body=extras)
    url = response.data[0].url or ""
    assert f".{output_format}?" in url
    download = httpx.get(url)
    assert download.headers["content-type"] == f"image/{output_format}"
    image = Image.open(io.BytesIO(download.content))
    assert (image.format, image.size) == (pillow, (512, 512))
    body = stack.bfl.submissions[0]
    assert (body["seed"], body["safety_tolerance"], body["output_format"]) == (42, 5, output_format)
    inline = stack.test.images.generate(
        model="flux-1-schnell", prompt="p", response_format="b64_json", extra_body={"output_format": output_format}
    )
    assert Image.open(io.BytesIO(base64.b64decode(inline.data[0].b64_json or ""))).format == pillow


def test_openai_clients_never_see_the_extras(stack: Stack) -> None:
    stack.live.images.generate(model="flux-1.1-pro", prompt="p")
    assert stack.bfl.submissions[0] == {"prompt": "p", "output_format": "png", "width": 1024, "height": 768}


def test_aliases_from_the_operator_catalog(settings: Settings) -> None:
    with running_stack(settings, catalog='[models."flux-1.1-pro"]\naliases = ["flux-pro"]\n') as stack:
        ids = [model.id for model in stack.live.models.list()]
        assert ids[:2] == ["flux-1.1-pro", "flux-pro"]
        assert stack.live.models.retrieve("flux-pro").id == "flux-pro"
        response = stack.live.images.generate(model="flux-pro", prompt="p", response_format="b64_json")
        assert len(response.data) == 1
        [row] = generations(stack.settings)
        assert row.model == "flux-1.1-pro"


FLUX_ROUTES = [(model.id, route.provider) for model in MODELS if model.id.startswith("flux") for route in model.routes]


@pytest.mark.slow  # a stack per route
@pytest.mark.parametrize(("model", "provider"), FLUX_ROUTES)
def test_every_output_format_through_every_flux_route(settings: Settings, model: str, provider: str) -> None:
    """Each upstream is asked only for formats it makes (the fakes refuse the others, as the real ones
    do); the rest is converted on our side."""
    catalog = f'[models."{model}"]\nroutes = [{{ provider = "{provider}" }}]\n'
    size = next(m.default_size for m in MODELS if m.id == model)
    with running_stack(settings, catalog=catalog, providers=(provider,)) as stack:
        for output_format, pillow in (("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")):
            common: dict[str, Any] = {"model": model, "prompt": "p", "size": size, "response_format": "b64_json"}
            if next(m for m in MODELS if m.id == model).generates:
                raw = stack.live.images.with_raw_response.generate(
                    **common, extra_body={"output_format": output_format}
                )
            else:  # Fill paints into an image
                photo, mask = picture(300, 200), picture(300, 200, mode="RGBA")
                raw = stack.live.images.with_raw_response.edit(
                    **common, image=("a.png", photo), mask=("m.png", mask), output_format=output_format
                )
            assert raw.headers["x-qubax-route"] == provider
            image = Image.open(io.BytesIO(base64.b64decode(raw.parse().data[0].b64_json or "")))
            assert image.format == pillow
            assert f"{image.size[0]}x{image.size[1]}" == size


def test_a_gpt_image_model_is_billed_by_its_token_count(stack: Stack) -> None:
    raw = stack.live.images.with_raw_response.generate(
        model="gpt-image-1.5",
        prompt="a red barn",
        n=2,
        size="1536x1024",
        quality="high",
        background="transparent",
        output_format="webp",
    )
    assert raw.headers["x-qubax-route"] == "openai"
    response = raw.parse()
    images = [Image.open(io.BytesIO(base64.b64decode(item.b64_json or ""))) for item in response.data]
    assert [(image.format, image.size) for image in images] == [("WEBP", (1536, 1024))] * 2
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (3, 2 * 6240)
    assert (response.quality, response.background, response.size) == ("high", "transparent", "1536x1024")
    [sent] = stack.openai.requests  # both images in one call, without response_format
    assert sent["n"] == 2 and "response_format" not in sent and sent["background"] == "transparent"
    [row] = generations(stack.settings)
    # 3 text tokens at $5 and 12,480 image tokens at $32 per million: $0.39936, not the $0.40 estimate.
    assert (row.model, row.images, row.outcome, row.cost_micros) == ("gpt-image-1.5", 2, "ok", 3 * 5 + 12_480 * 32)


def test_a_gpt_image_model_without_a_token_count_is_billed_its_estimate(stack: Stack) -> None:
    stack.openai.drop_usage = True
    stack.live.images.generate(model="gpt-image-1-mini", prompt="a red barn", quality="medium")
    [row] = generations(stack.settings)
    assert row.cost_micros == 11_000  # OpenAI's published $0.011 for a medium 1024x1024 image


@pytest.mark.parametrize(
    ("size", "quality", "asked"), [("1792x1024", "hd", "high"), ("1024x1024", "standard", "medium")]
)
def test_dall_e_3_is_made_by_gpt_image_2_where_the_host_no_longer_serves_it(
    stack: Stack, size: str, quality: str, asked: str
) -> None:
    stack.openai.retired = True  # 404 model_not_found, as OpenAI's own API answers today
    raw = stack.live.images.with_raw_response.generate(
        model="dall-e-3", prompt="a red barn", size=size, quality=quality, style="natural"
    )
    assert raw.headers["x-qubax-route"] == "openai:gpt-image-2"
    image = raw.parse().data[0]
    assert image.url is not None  # dall-e-3's default answer, whatever made it
    width, height = (int(side) for side in size.split("x"))
    assert png(httpx.get(image.url).content).size == (width, height)
    refused, sent = stack.openai.requests
    assert refused["model"] == "dall-e-3"
    assert (sent["model"], sent["size"], sent["quality"]) == ("gpt-image-2", size, asked)  # gpt-image-2 takes it
    assert "style" not in sent and "response_format" not in sent
    [row] = generations(stack.settings)
    tokens = 6240 if size != "1024x1024" else 1056 if asked == "medium" else 4160
    assert (row.upstream, row.outcome, row.cost_micros) == ("openai:gpt-image-2", "ok", 3 * 5 + tokens * 30)
    assert [(a.upstream_model, a.outcome) for a in attempts(stack.settings)] == [
        ("dall-e-3", "upstream_model_not_found"),
        ("gpt-image-2", "ok"),
    ]


@pytest.mark.parametrize("model", ["gpt-image-1.5", "gpt-image-1-mini", "gpt-image-1"])
def test_gpt_image_models_openai_shut_down_are_made_by_gpt_image_2(stack: Stack, model: str) -> None:
    """Not a 502: OpenAI answers each 404 model_not_found, and gpt-image-2 stands in (on the same key)."""
    stack.openai.retired = True
    raw = stack.live.images.with_raw_response.generate(model=model, prompt="a red barn", quality="low", n=2)
    assert raw.headers["x-qubax-route"] == "openai:gpt-image-2"
    answer = raw.parse()
    assert len(answer.data) == 2 and answer.usage is not None and answer.usage.output_tokens == 2 * 272
    assert [body["model"] for body in stack.openai.requests] == [model, "gpt-image-2"]
    [row] = generations(stack.settings)
    assert (row.upstream, row.outcome, row.images, row.cost_micros) == ("openai:gpt-image-2", "ok", 2, 3 * 5 + 544 * 30)
    edited = stack.live.images.with_raw_response.edit(model=model, image=("a.png", picture(64, 64)), prompt="blue")
    assert edited.headers["x-qubax-route"] == "openai:gpt-image-2"
    assert [edit["fields"]["model"] for edit in stack.openai.edits] == [model, "gpt-image-2"]


@pytest.mark.parametrize("model", ["gpt-image-1.5-2025-12-16", "chatgpt-image-latest", "dall-e-2"])
def test_names_openai_shut_down_that_are_not_served_name_their_successor(stack: Stack, model: str) -> None:
    for ask in (
        lambda: stack.live.images.generate(model=model, prompt="a red barn"),
        lambda: stack.live.images.edit(model=model, image=("a.png", picture(64, 64)), prompt="blue"),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            ask()
        assert caught.value.param == "model"
        assert f"`{model}` has been shut down" in caught.value.message and "`gpt-image-2`" in caught.value.message
    assert stack.openai.requests == [] and stack.openai.edits == []


def test_a_host_that_still_serves_a_retired_model_makes_it(stack: Stack) -> None:
    raw = stack.live.images.with_raw_response.generate(model="gpt-image-1-mini", prompt="a red barn", quality="low")
    assert raw.headers["x-qubax-route"] == "openai"
    assert [body["model"] for body in stack.openai.requests] == ["gpt-image-1-mini"]


def test_an_edit_reaches_the_upstream_as_multipart_and_is_billed_by_tokens(stack: Stack) -> None:
    noise = Image.frombytes("RGB", (700, 700), random.Random(1).randbytes(700 * 700 * 3))
    out = io.BytesIO()
    noise.save(out, "PNG")
    big = out.getvalue()  # 1.4 MB: past the megabyte after which uploads wait on disk, not in memory
    assert len(big) > 1024 * 1024
    raw = stack.live.images.with_raw_response.edit(
        model="gpt-image-1.5",
        image=[("a.png", big), ("b.webp", picture(40, 40, "WEBP"))],
        mask=("m.png", picture(700, 700, mode="RGBA")),
        prompt="a red barn",
        quality="low",
        input_fidelity="high",
    )
    assert raw.headers["x-qubax-route"] == "openai"
    response = raw.parse()
    assert response.usage is not None and response.usage.output_tokens == 272
    [edit] = stack.openai.edits
    assert edit["images"] == [("a.png", "PNG", (700, 700)), ("b.webp", "WEBP", (40, 40))]
    assert edit["mask"] == ("m.png", "PNG", (700, 700))
    assert edit["fields"]["input_fidelity"] == "high" and "response_format" not in edit["fields"]
    [row] = generations(stack.settings)
    assert (row.model, row.images, row.outcome, row.cost_micros) == ("gpt-image-1.5", 1, "ok", 3 * 5 + 272 * 32)


def test_the_gpt_image_route_stands_in_for_dall_e_3_only_when_the_host_does_not_serve_it(stack: Stack) -> None:
    stack.openai.fail_status = 503  # a failing host, not one without dall-e-3
    with pytest.raises(openai.InternalServerError):
        stack.live.images.generate(model="dall-e-3", prompt="a red barn")
    assert [body["model"] for body in stack.openai.requests] == ["dall-e-3"]
    stack.openai.fail_status, stack.openai.retired = None, True
    for _ in range(6):  # past the breaker's five failures: "not served" is no failure of the route
        stack.live.images.generate(model="dall-e-3", prompt="a red barn")
    assert [body["model"] for body in stack.openai.requests[1:]] == ["dall-e-3", "gpt-image-2"] * 6
