"""Every client-facing error, as the official SDK and a raw HTTP client see it."""

import asyncio
import base64
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from pydantic import SecretStr
from starlette.requests import Request

from qubax.api.authentication import base_url
from qubax.api.routes import WATCH_AFTER_SECONDS, until_disconnect
from qubax.app import create_app
from qubax.errors import ClientDisconnected
from qubax.server.settings import Settings
from tests.catalog import MODELS
from tests.conftest import cli_env, create_key, eventually
from tests.server import serve


@pytest.fixture
def client(base_url: str, test_key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=test_key, base_url=base_url + "/v1", max_retries=0)


def generate_error(client: openai.OpenAI, **kwargs: Any) -> openai.APIStatusError:
    kwargs.setdefault("model", "flux-1.1-pro")
    kwargs.setdefault("prompt", "a cat")
    with pytest.raises(openai.APIStatusError) as caught:
        client.images.generate(**kwargs)
    return caught.value


def assert_openai_error(response: httpx.Response, status: int, code: str | None, param: str | None) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"].startswith("req_")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param)
    assert error["message"]
    return dict(error)


@pytest.mark.parametrize(
    ("kwargs", "code", "param", "in_message"),
    [
        ({"n": 5}, "invalid_value", "n", "between 1 and 4"),
        ({"n": 0}, "invalid_value", "n", "n=0"),
        ({"model": "dall-e-3", "n": 2}, "invalid_value", "n", "dall-e-3 supports n=1 only"),
        ({"n": "2"}, "invalid_type", "n", "expected an integer"),
        ({"n": True}, "invalid_type", "n", "expected an integer"),
        ({"size": "1792x1024"}, "invalid_size", "size", "between 256 and 1440 and a multiple of 32"),
        ({"size": "1000x1000"}, "invalid_size", "size", "multiple of 32"),
        ({"size": "big"}, "invalid_size", "size", "WIDTHxHEIGHT"),  # one code for every size error
        ({"size": "01024x01024"}, "invalid_size", "size", "WIDTHxHEIGHT"),  # sizes are written one way only
        ({"size": "1024x1024\n"}, "invalid_size", "size", "WIDTHxHEIGHT"),
        ({"size": "\uff11\uff10\uff12\uff14x1024"}, "invalid_size", "size", "WIDTHxHEIGHT"),  # fullwidth digits
        ({"model": "dall-e-3", "size": "256x256"}, "invalid_size", "size", "1024x1024, 1792x1024, 1024x1792"),
        ({"model": "flux-1.1-pro-ultra", "size": "1024x1024"}, "invalid_size", "size", "2752x1536"),
        (
            {"response_format": "gif"},
            "invalid_value",
            "response_format",
            "Invalid value for 'response_format': 'gif'. Supported values for flux-1.1-pro are: 'url', 'b64_json'.",
        ),
        ({"quality": "hd"}, "invalid_value", "quality", "'auto', 'standard'"),
        ({"model": "dall-e-3", "quality": "low"}, "invalid_value", "quality", "'hd'"),
        ({"style": "vivid"}, "invalid_value", "style", "omit the parameter"),
        ({"model": "dall-e-3", "style": "cartoon"}, "invalid_value", "style", "'natural'"),
        ({"prompt": "x" * 4001}, "string_above_max_length", "prompt", "4000"),
        ({"prompt": "   "}, "invalid_value", "prompt", "non-empty"),
        ({"prompt": 42}, "invalid_type", "prompt", "expected a string"),
        ({"extra_body": {"prompt": None}}, "invalid_type", "prompt", "expected a string, but got null."),
        ({"extra_body": {"n": [1]}}, "invalid_type", "n", "expected an integer, but got an array."),
        # (`steps` is flux-2-flex's extension since issue 26: another name no model takes.)
        ({"extra_body": {"num_inference_steps": 3}}, "unknown_parameter", "num_inference_steps", "Unknown parameter"),
        ({"extra_body": {"seed": -1}}, "invalid_value", "seed", "between 0 and 4294967295"),
        ({"extra_body": {"seed": "7"}}, "invalid_type", "seed", "expected an integer"),
        ({"extra_body": {"safety_tolerance": 7}}, "invalid_value", "safety_tolerance", "between 0 and 6"),
        ({"extra_body": {"output_format": "gif"}}, "invalid_value", "output_format", "'output_format': 'gif'"),
        # The GPT image models' parameters, refused where they cannot apply.
        ({"background": "transparent"}, "invalid_value", "background", "for flux-1.1-pro are: none"),
        ({"output_compression": 50}, "invalid_value", "output_compression", "flux-1.1-pro does not take"),
        ({"moderation": "low"}, "invalid_value", "moderation", "for flux-1.1-pro are: none"),
        (
            {"model": "gpt-image-1.5", "background": "transparent", "output_format": "jpeg"},
            "invalid_value",
            "background",
            "needs output_format png or webp; got jpeg",
        ),
        (
            {"model": "gpt-image-1.5", "output_compression": 50},
            "invalid_value",
            "output_compression",
            "jpeg and webp output, not png",
        ),
        (
            {"model": "gpt-image-1.5", "output_compression": 101, "output_format": "webp"},
            "invalid_value",
            "output_compression",
            "between 0 and 100",
        ),
        ({"model": "gpt-image-1.5", "moderation": "high"}, "invalid_value", "moderation", "'auto', 'low'"),
        ({"model": "gpt-image-1.5", "quality": "hd"}, "invalid_value", "quality", "'low', 'medium', 'high'"),
        ({"model": "gpt-image-1.5", "n": 11}, "invalid_value", "n", "between 1 and 10"),
        ({"model": "gpt-image-1.5", "size": "1792x1024"}, "invalid_size", "size", "1024x1024, 1536x1024, 1024x1536"),
        ({"model": "gpt-image-2", "size": "1000x1000"}, "invalid_size", "size", "multiples of 16"),
        ({"model": "gpt-image-2", "size": "3840x1024"}, "invalid_size", "size", "within 1:3 and 3:1"),
        ({"model": "gpt-image-2", "size": "4096x2304"}, "invalid_size", "size", "at most 3840"),
        ({"model": "gpt-image-1.5", "prompt": "x" * 32001}, "string_above_max_length", "prompt", "32000"),
        (
            {"stream": True, "response_format": "url"},
            "invalid_value",
            "response_format",
            "carries its images as base64",
        ),
        ({"extra_body": {"partial_images": 4}}, "invalid_value", "partial_images", "between 0 and 3"),
        ({"model": "gpt-image-1.5", "extra_body": {"seed": 1}}, "invalid_value", "seed", "a FLUX extension"),
        ({"model": "dall-e-3", "extra_body": {"safety_tolerance": 2}}, "invalid_value", "safety_tolerance", "FLUX"),
        ({"model": "flux-kontext-pro", "background": "opaque"}, "invalid_value", "background", "none (omit"),
        ({"model": "flux-1-fill-pro"}, "invalid_value", "model", "only edits images"),
    ],
)
def test_invalid_input_is_a_400_naming_the_field(
    client: openai.OpenAI, kwargs: dict[str, Any], code: str, param: str, in_message: str
) -> None:
    error = generate_error(client, **kwargs)
    assert isinstance(error, openai.BadRequestError)
    assert (error.status_code, error.code, error.param, error.type) == (400, code, param, "invalid_request_error")
    assert in_message in error.message
    assert error.request_id and error.request_id.startswith("req_")


def test_missing_model_names_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a cat")
    assert (caught.value.code, caught.value.param) == ("missing_required_parameter", "model")


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    error = generate_error(client, model="flux-9-mega")
    assert isinstance(error, openai.NotFoundError)
    assert (error.code, error.param) == ("model_not_found", "model")
    assert "GET /v1/models lists the models" in error.message


def test_unconfigured_model_says_which_credential_enables_it(base_url: str, live_key: str) -> None:
    client = openai.OpenAI(api_key=live_key, base_url=base_url + "/v1", max_retries=0)
    error = generate_error(client, model="flux-1.1-pro")
    assert isinstance(error, openai.NotFoundError)
    assert "BFL_API_KEY" in error.message
    assert "TOGETHER_API_KEY" in generate_error(client, model="flux-1-schnell").message
    assert "OPENAI_API_KEY" in generate_error(client, model="dall-e-3").message


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b'{"model": "flux-1.1-pro", "prompt": ', None, "invalid_json"),
        (b"\xff\xfe", None, "invalid_json"),
        (b'["model"]', None, "invalid_json"),
        (b'{"model": "flux-1.1-pro"}', "prompt", "missing_required_parameter"),
        (b'{"model": "flux-1.1-pro", "prompt": "p", "n": 1.5}', "n", "invalid_type"),
        (b'{"model": "flux-1.1-pro", "prompt": "p", "n": null, "size": null}', None, None),
        # Hostile input is a 400, never a 500: a lone UTF-16 surrogate, deep nesting, NaN, a huge integer.
        (b'{"model": "flux-1.1-pro", "prompt": "\\ud800"}', None, "invalid_json"),
        (b'{"model": "flux-1.1-pro", "prompt": "p", "user": "\\udfff x"}', None, "invalid_json"),
        (
            b'{"model": "flux-1.1-pro", "prompt": "p", "user": ' + b"[" * 1000 + b"]" * 1000 + b"}",
            "user",
            "invalid_type",
        ),
        (b"[" * 5000 + b"]" * 5000, None, "invalid_json"),
        (b'{"model": "flux-1.1-pro", "prompt": "p", "seed": NaN}', None, "invalid_json"),
        (b'{"model": "flux-1.1-pro", "prompt": "p", "seed": 18446744073709551617}', "seed", "invalid_value"),
    ],
)
def test_raw_bodies(base_url: str, test_key: str, body: bytes, param: str | None, code: str | None) -> None:
    response = httpx.post(
        f"{base_url}/v1/images/generations",
        content=body,
        headers={"authorization": f"Bearer {test_key}", "content-type": "application/json"},
    )
    if code is None:
        assert response.status_code == 200
    else:
        error = assert_openai_error(response, 400, code, param)
        assert param != "seed" or "out of range" in error["message"]


def test_huge_body_is_413(base_url: str, test_key: str) -> None:
    body = b'{"model": "flux-1.1-pro", "prompt": "' + b"x" * (1024 * 1024) + b'"}'
    headers = {"authorization": f"Bearer {test_key}"}
    response = httpx.post(f"{base_url}/v1/images/generations", content=body, headers=headers)
    assert_openai_error(response, 413, "request_too_large", None)

    def chunks() -> Any:  # no content-length: the limit must hold while streaming too
        for _ in range(20):
            yield b"x" * 65536

    response = httpx.post(f"{base_url}/v1/images/generations", content=chunks(), headers=headers)
    assert_openai_error(response, 413, "request_too_large", None)


def test_authentication(base_url: str, settings: Settings) -> None:
    url = f"{base_url}/v1/images/generations"
    body = {"model": "flux-1.1-pro", "prompt": "p"}
    error = assert_openai_error(httpx.post(url, json=body), 401, "missing_api_key", None)
    assert "didn't provide an API key" in error["message"]
    live = "qbx_live_" + "B" * 43
    response = httpx.post(url, json=body, headers={"authorization": live})  # the `Bearer ` prefix forgotten
    error = assert_openai_error(response, 401, "missing_api_key", None)
    assert "must read `Bearer YOUR_KEY`" in error["message"] and live not in error["message"]
    wrong = "qbx_live_" + "A" * 43
    error = assert_openai_error(
        httpx.post(url, json=body, headers={"authorization": f"Bearer {wrong}"}), 401, "invalid_api_key", None
    )
    assert wrong not in error["message"]  # never echo a secret back
    assert_openai_error(
        httpx.post(url, json=body, headers={"authorization": "Bearer sk-openai"}), 401, "invalid_api_key", None
    )

    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(api_key=wrong, base_url=base_url + "/v1", max_retries=0).images.generate(**body)
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(api_key=wrong, base_url=base_url + "/v1", max_retries=0).models.list()


def test_auth_comes_before_validation(base_url: str) -> None:
    response = httpx.post(f"{base_url}/v1/images/generations", content=b"not json")
    assert response.status_code == 401


def test_unknown_route_is_openai_shaped(base_url: str) -> None:
    error = assert_openai_error(httpx.post(f"{base_url}/v1/images/edits-nope"), 404, None, None)
    assert error["message"] == "Invalid URL (POST /v1/images/edits-nope)"


def test_healthz(base_url: str) -> None:
    response = httpx.get(f"{base_url}/healthz")
    assert response.status_code == 200
    assert response.headers["x-request-id"].startswith("req_")


def test_revoked_key_is_refused(settings: Settings, base_url: str) -> None:
    key = create_key(settings, test=True)
    client = openai.OpenAI(api_key=key, base_url=base_url + "/v1", max_retries=0)
    assert client.models.list().data
    from click.testing import CliRunner

    from qubax.server.cli import main

    result = CliRunner().invoke(main, ["keys", "revoke", key], env=cli_env(settings))
    assert result.exit_code == 0, result.output

    def refused() -> openai.AuthenticationError:
        try:
            client.models.list()
        except openai.AuthenticationError as error:
            return error
        raise AssertionError("the revoked key still works")

    assert "revoked" in eventually(refused).message  # within the key cache's second


class Connection:
    """What `until_disconnect` needs of a request: `receive`, which answers `http.disconnect` once the
    client has gone (here, when the test says so)."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()
        self.receives = 0

    async def receive(self) -> dict[str, Any]:
        self.receives += 1
        await self.gone.wait()
        return {"type": "http.disconnect"}


@pytest.mark.anyio
async def test_work_that_ends_soon_is_not_watched() -> None:
    connection = Connection()
    assert await until_disconnect(connection, asyncio.sleep(0, "done")) == "done"  # type: ignore[arg-type]
    await asyncio.sleep(WATCH_AFTER_SECONDS * 2)
    assert connection.receives == 0


@pytest.mark.anyio
async def test_a_client_that_leaves_cancels_the_work() -> None:
    connection = Connection()
    cancelled = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    asyncio.get_running_loop().call_later(WATCH_AFTER_SECONDS * 2, connection.gone.set)
    with pytest.raises(ClientDisconnected):
        await asyncio.wait_for(until_disconnect(connection, work()), 5)  # type: ignore[arg-type]
    assert cancelled.is_set() and connection.receives == 1


@pytest.mark.anyio
async def test_a_cancel_from_elsewhere_stays_a_cancel() -> None:
    connection = Connection()
    watched = asyncio.ensure_future(until_disconnect(connection, asyncio.sleep(30)))  # type: ignore[arg-type]
    await asyncio.sleep(WATCH_AFTER_SECONDS * 2)
    assert connection.receives == 1  # watching by now
    watched.cancel()
    with pytest.raises(asyncio.CancelledError):
        await watched


@pytest.mark.parametrize(
    "scope",
    [
        {"scheme": "http", "server": ("127.0.0.1", 8000), "headers": [(b"host", b"api.example.com")]},
        {"scheme": "https", "server": ("10.0.0.2", 443), "headers": [(b"host", b"images.example.com:8443")]},
        {"scheme": "https", "server": ("10.0.0.2", 443), "headers": [], "root_path": "/qubax"},
        {"scheme": "http", "server": ("10.0.0.2", 8080), "headers": [(b"accept", b"*/*")]},
        {"scheme": "http", "server": ["10.0.0.2", 80], "headers": [], "app_root_path": "/a", "root_path": "/b"},
        {"scheme": "http", "server": None, "headers": []},
    ],
)
def test_base_url_is_starlettes(scope: dict[str, Any]) -> None:
    full = {"type": "http", "path": "/v1/images/generations", "query_string": b"x=1", **scope}
    assert base_url(full) == str(Request(full).base_url)
    assert base_url(full) == base_url(full)  # remembered, unchanged


def test_the_root_says_what_this_server_is(base_url: str) -> None:
    response = httpx.get(base_url + "/")
    assert response.status_code == 200
    info = response.json()
    assert info["api_base"] == "/v1" and info["docs"] == "/docs"
    assert httpx.get(base_url + info["docs"]).status_code == 200
    assert httpx.get(base_url + info["openapi"]).json()["paths"]["/v1/images/generations"]


def test_a_live_key_is_listed_the_models_it_can_use(settings: Settings, live_key: str, test_key: str) -> None:
    settings.credentials["together"] = SecretStr("together-key")  # serves flux-1.1-pro and flux-1-schnell
    with serve(create_app(settings)) as url:
        live = openai.OpenAI(api_key=live_key, base_url=url + "/v1", max_retries=0)
        test = openai.OpenAI(api_key=test_key, base_url=url + "/v1", max_retries=0)
        assert [model.id for model in live.models.list()] == ["flux-1.1-pro", "flux-1-schnell"]
        names = [name for model in MODELS for name in (model.id, *model.aliases)]  # aliases listed after each
        assert [model.id for model in test.models.list()] == names
        assert live.models.retrieve("flux-1-schnell").id == "flux-1-schnell"
        with pytest.raises(openai.NotFoundError) as caught:
            live.models.retrieve("dall-e-3")
        assert "OPENAI_API_KEY" in caught.value.message
        assert test.models.retrieve("dall-e-3").id == "dall-e-3"


def test_keys_create_says_when_no_upstream_is_configured(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUBAX_")} | {"QUBAX_DATA_DIR": str(tmp_path)}
    qubax = str(Path(sys.executable).parent / "qubax")
    live = subprocess.run([qubax, "keys", "create"], env=env, capture_output=True, text=True, check=True)
    test = subprocess.run([qubax, "keys", "create", "--test"], env=env, capture_output=True, text=True, check=True)
    assert "no upstream is configured" in live.stderr and "BFL_API_KEY (flux-1.1-pro" in live.stderr
    assert "no upstream" not in test.stderr


def test_gpt_image_models_answer_base64_with_their_settings(client: openai.OpenAI) -> None:
    response = client.images.generate(
        model="gpt-image-1.5", prompt="x" * 5000, size="1536x1024", quality="high", background="transparent", n=2
    )  # prompts past 4000 characters are these models' to take
    assert [item.url for item in response.data] == [None, None] and all(item.b64_json for item in response.data)
    assert (response.size, response.quality, response.background, response.output_format) == (
        "1536x1024",
        "high",
        "transparent",
        "png",
    )
    assert response.usage is None  # test keys reach no upstream, so there is no token count
    plain = client.images.generate(model="gpt-image-2", prompt="a fox", size="2048x1152", output_format="webp")
    assert (plain.size, plain.output_format, plain.quality, plain.background) == ("2048x1152", "webp", None, None)
    linked = client.images.generate(model="gpt-image-1-mini", prompt="a fox", response_format="url")
    assert linked.data[0].url is not None  # our extension: a link when asked for one


# --- edits ------------------------------------------------------------------------------------------------


def picture(width: int, height: int, kind: str = "PNG", mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), (200, 30, 30, 0)[: len(mode)]).save(out, kind)
    return out.getvalue()


def test_an_edit_of_one_image_and_of_several_with_a_mask(client: openai.OpenAI) -> None:
    one = client.images.edit(model="gpt-image-1.5", image=("a.png", picture(96, 64)), prompt="make it blue")
    [made] = one.data
    assert Image.open(io.BytesIO(base64.b64decode(made.b64_json or ""))).size == (1024, 1024)
    several = client.images.edit(
        model="gpt-image-2",
        image=[("a.png", picture(64, 64)), ("b.jpg", picture(48, 32, "JPEG")), ("c.webp", picture(20, 20, "WEBP"))],
        mask=("mask.png", picture(64, 64, mode="RGBA")),
        prompt="put them together",
        n=2,
        size="2048x1152",
        input_fidelity="high",
        output_format="webp",
    )
    assert len(several.data) == 2 and (several.size, several.output_format) == ("2048x1152", "webp")


def test_flux_edits_for_test_keys_take_the_first_image_aspect_ratio(client: openai.OpenAI) -> None:
    kontext = client.images.edit(model="flux-kontext-pro", image=("a.png", picture(300, 200)), prompt="at night")
    [made] = kontext.data
    assert made.url is not None and made.b64_json is None  # FLUX models answer links by default
    assert Image.open(io.BytesIO(httpx.get(made.url).content)).size == (1248, 832)
    mask = Image.new("RGBA", (200, 400), (0, 0, 0, 0))
    out = io.BytesIO()
    mask.save(out, "PNG")
    fill = client.images.edit(
        model="flux-1-fill-pro",
        image=("a.jpg", picture(200, 400, "JPEG")),
        mask=("m.png", out.getvalue()),
        prompt="a door",
        size="512x512",
        n=2,
        response_format="b64_json",
    )
    assert [Image.open(io.BytesIO(base64.b64decode(d.b64_json or ""))).size for d in fill.data] == [(512, 512)] * 2


def test_fill_only_edits(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="flux-1-fill-pro", prompt="a door")
    assert caught.value.param == "model"
    assert "only edits images: send an image and a mask to POST /v1/images/edits" in caught.value.message


def test_an_edit_of_sixteen_images_through_the_async_client(base_url: str, test_key: str) -> None:
    async def edit() -> openai.types.ImagesResponse:
        async with openai.AsyncOpenAI(api_key=test_key, base_url=base_url + "/v1", max_retries=0) as client:
            images = [(f"{i}.png", picture(32, 32)) for i in range(16)]
            return await client.images.edit(model="gpt-image-1-mini", image=images, prompt="a grid", quality="low")

    assert asyncio.run(edit()).quality == "low"


KONTEXT_MASK = ("invalid_value", "mask", "flux-kontext-pro does not take a mask")
FIVE = ("invalid_value", "image", "flux-kontext-max takes at most 4 images to edit; got 5")
TWO_FILLS = ("invalid_value", "image", "flux-1-fill-pro takes at most 1 image to edit; got 2")


@pytest.mark.parametrize(
    ("change", "code", "param", "says"),
    [
        ({"model": "flux-1.1-pro"}, "invalid_value", "model", "flux-1.1-pro does not edit images; models that do:"),
        ({"model": "dall-e-3"}, "invalid_value", "model", "dall-e-3 does not edit images"),
        ({"image": ("notes.txt", b"hello")}, "invalid_value", "image", "'notes.txt' is not a PNG, JPEG or WebP"),
        ({"image": [(f"{i}.png", b"x") for i in range(17)]}, "invalid_value", "image", "At most 16 images"),
        ({"mask": ("m.png", picture(32, 32, mode="RGBA"))}, "invalid_value", "mask", "must be the size of the first"),
        ({"mask": ("m.jpg", picture(64, 64, "JPEG"))}, "invalid_value", "mask", "must be a PNG image; got jpeg"),
        ({"model": "gpt-image-1-mini", "input_fidelity": "high"}, "invalid_value", "input_fidelity", "none (omit"),
        ({"size": "1792x1024"}, "invalid_size", "size", "1024x1024, 1536x1024, 1024x1536"),
        ({"background": "transparent", "output_format": "jpeg"}, "invalid_value", "background", "png or webp"),
        ({"extra_body": {"moderation": "low"}}, "unknown_parameter", "moderation", "Unknown parameter"),
        ({"model": "flux-kontext-pro", "mask": ("m.png", picture(64, 64, mode="RGBA"))}, *KONTEXT_MASK),
        ({"model": "flux-kontext-max", "image": [(f"{i}.png", picture(8, 8)) for i in range(5)]}, *FIVE),
        ({"model": "flux-kontext-pro", "input_fidelity": "high"}, "invalid_value", "input_fidelity", "none (omit"),
        ({"model": "flux-kontext-pro", "quality": "high"}, "invalid_value", "quality", "'auto', 'standard'"),
        ({"model": "flux-1-fill-pro"}, "missing_required_parameter", "mask", "needs a mask, or a first image whose"),
        ({"model": "flux-1-fill-pro", "image": [("a.png", picture(8, 8))] * 2}, *TWO_FILLS),
    ],
)
def test_bad_edits_are_400s_naming_the_field(
    client: openai.OpenAI, change: dict[str, Any], code: str, param: str, says: str
) -> None:
    request: dict[str, Any] = {"model": "gpt-image-1.5", "image": ("a.png", picture(64, 64)), "prompt": "x"} | change
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(**request)
    assert (caught.value.code, caught.value.param) == (code, param)
    assert says in caught.value.message


def test_an_edit_without_an_image_names_it(base_url: str, test_key: str) -> None:
    headers = {"authorization": f"Bearer {test_key}"}
    response = httpx.post(
        f"{base_url}/v1/images/edits", data={"prompt": "x"}, files={"other": ("a", b"a")}, headers=headers
    )
    assert_openai_error(response, 400, "unknown_parameter", "other")
    response = httpx.post(f"{base_url}/v1/images/edits", data={"prompt": "x"}, headers=headers)
    assert_openai_error(response, 400, "missing_required_parameter", "image")


def test_an_upload_over_the_limit_is_413_before_it_is_read_whole(settings: Settings, test_key: str) -> None:
    settings.max_upload_bytes = 1024 * 1024
    with serve(create_app(settings)) as url:
        client = openai.OpenAI(api_key=test_key, base_url=url + "/v1", max_retries=0)
        with pytest.raises(openai.APIStatusError) as caught:
            client.images.edit(model="gpt-image-1.5", image=("big.png", b"\x89PNG" + b"0" * 2_000_000), prompt="x")
    assert (caught.value.status_code, caught.value.code) == (413, "request_too_large")


def test_an_image_over_the_per_image_limits_is_a_400_naming_it(
    client: openai.OpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("qubax.pipeline.uploads.MAX_IMAGE_BYTES", 1024)
    big = ("big.png", picture(64, 64) + b"\0" * 2048)  # trailing bytes: still a PNG, now over 1 KiB
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(model="gpt-image-1.5", image=big, prompt="x")
    assert caught.value.param == "image" and "'big.png' is larger than" in caught.value.message
    monkeypatch.undo()
    monkeypatch.setattr("qubax.pipeline.uploads.MAX_PIXELS", 1000)
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(model="gpt-image-1.5", image=("a.png", picture(64, 64)), prompt="x")
    assert caught.value.param == "image" and "64x64: more than" in caught.value.message


def test_a_decompression_bomb_is_refused_from_its_header(client: openai.OpenAI) -> None:
    out = io.BytesIO()
    Image.new("1", (20000, 10000)).save(out, "PNG")  # 200 megapixels in a few kilobytes
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(model="flux-kontext-pro", image=("bomb.png", out.getvalue()), prompt="x")
    assert caught.value.param == "image" and "too many pixels" in caught.value.message
