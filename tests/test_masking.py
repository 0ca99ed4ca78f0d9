"""Secrets stay out of what clients, logs and the database see, even when an upstream echoes them."""

import logging
from collections.abc import Iterator

import openai
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from qubax.records import tables
from qubax.server.masking import MASK, Mask, configured_secrets
from qubax.server.settings import Settings
from tests.server import serve
from tests.stack import rows, running_stack

# Letters only, and not shaped like a key: only the list of configured secrets can catch it.
PLAIN_KEY = "correcthorsebatterystaple"


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("Incorrect API key provided: sk-proj-abcDEF1234. See your keys.", f"API key provided: {MASK}. See"),
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.x", f"Authorization: Bearer {MASK}"),
        ("Basic dXNlcjpwYXNz is refused", f"Basic {MASK} is refused"),
        ("https://x.test/get?id=7&key=hunter2&x=1", f"https://x.test/get?id=7&key={MASK}&x=1"),
        ('{"api_key": "plainwords"}', f'{{"api_key": "{MASK}"}}'),
        ("token r8_AbCdEf123456 rejected", f"token {MASK} rejected"),
        ("Key 0f8fad5b-d9cb-469f-a165-70867728950e:5d41402abc4b2a76b9719d911017c592", f"Key {MASK}"),
        ("random 5d41402abc4b2a76b9719d911017c592 here", f"random {MASK} here"),
    ],
)
def test_secret_shaped_strings_are_masked(text: str, masked: str) -> None:
    assert masked in Mask([])(text)


@pytest.mark.parametrize(
    "text",
    [
        "Together account is out of credit",
        "task 0f8fad5b-d9cb-469f-a165-70867728950e failed: CUDA error: out of memory",
        "The model `dall-e-3` does not exist or you do not have access to it.",
        "prompt too long (max 2000 tokens), seed 1234567890123",
        "ConnectionRefusedError (127.0.0.1:9)",
        "The key you used is wrong; width must be a multiple of 32",
    ],
)
def test_ordinary_text_and_ids_are_kept(text: str) -> None:
    assert Mask([])(text) == text


def test_configured_secrets_are_masked_whatever_their_shape() -> None:
    mask = Mask(["correcthorse", "batterystaple-longer", "abc"])  # too short to mask safely: left alone

    assert mask("keys correcthorse and batterystaple-longer, abc") == f"keys {MASK} and {MASK}, abc"


def test_every_configured_secret_is_gathered(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value")
    settings.credentials = {"bfl": SecretStr("bfl-one, bfl-two"), "fal": SecretStr("fal-id:fal-secret")}
    settings.admin_token = SecretStr("a" * 32)
    settings.redis_url = "redis://:p%40ss word@localhost:6379/0"

    found = configured_secrets(settings)

    for secret in ("bfl-one", "bfl-two", "fal-id:fal-secret", "a" * 32, "p@ss word", "p%40ss word"):
        assert secret in found
    assert "aws-secret-value" in found
    assert settings.signing_secret is None or settings.signing_secret.get_secret_value() in found


# --- an upstream that echoes the credential, end to end ------------------------------------------------


def echoing(status: int) -> Starlette:
    """A hostile upstream: answers everything with `status` and the caller's credential, in every field
    where a provider puts its error text (OpenAI's `error.message`, FastAPI's and RFC 7807's `detail`)."""

    async def answer(request: Request) -> Response:
        sent = request.headers.get("x-key") or request.headers.get("authorization", "").split(" ", 1)[-1]
        text = f"Incorrect API key provided: {sent}. Your account {sent} is out of credit."
        body = {"error": {"message": text, "type": "invalid_request_error", "code": None}, "detail": text}
        return JSONResponse(body, status)

    return Starlette(routes=[Route("/{path:path}", answer, methods=["GET", "POST", "PUT"])])


@pytest.fixture(params=[401, 400, 500])
def hostile(request: pytest.FixtureRequest) -> Iterator[tuple[int, str]]:
    with serve(echoing(request.param)) as url:
        yield request.param, url


@pytest.mark.parametrize(
    ("provider", "model", "path"),
    [
        ("bfl", "flux-1.1-pro", ""),
        ("fal", "flux-1.1-pro", ""),
        ("replicate", "flux-1.1-pro", "/v1"),
        ("together", "flux-1.1-pro", "/v1"),
        ("openai", "dall-e-3", "/v1"),
    ],
)
def test_an_echoed_credential_reaches_neither_client_nor_log_nor_database(
    settings: Settings,
    hostile: tuple[int, str],
    provider: str,
    model: str,
    path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    status, url = hostile
    caplog.set_level(logging.DEBUG)
    settings.credentials[provider] = SecretStr(PLAIN_KEY)
    catalog = f'[models."{model}"]\nroutes = [{{ provider = "{provider}" }}]\n'
    with (
        running_stack(settings, catalog=catalog, providers=(), base_urls={provider: url + path}) as stack,
        pytest.raises(openai.APIStatusError) as caught,
    ):
        stack.live.images.generate(model=model, prompt="a fox", size="1024x1024")

    answer = caught.value.response.text
    assert caught.value.status_code == 502
    assert f"({status})" in answer  # what failed is said, in our words
    assert PLAIN_KEY not in answer and "out of credit" not in answer
    assert PLAIN_KEY not in caplog.text
    for path_ in settings.data_dir.glob("qubax.db*"):  # the database and its write-ahead log
        assert PLAIN_KEY.encode() not in path_.read_bytes()
    (attempt,) = rows(settings, tables.Attempt)
    assert attempt.error is not None and MASK in attempt.error  # the operator still sees what was said
    assert f"Incorrect API key provided: {MASK}" in caplog.text
