"""The app's wiring: crashes become OpenAI-shaped 500s, every response has a request id."""

import asyncio
import gc

import httpx
import openai
import pytest
from pydantic import ValidationError
from sqlalchemy import select

from qubax.app import create_app
from qubax.pipeline import generation
from qubax.records import db, tables
from qubax.server.services import GC_MIDDLE_THRESHOLD, GC_THRESHOLD
from qubax.server.settings import Settings
from tests.server import serve


async def explode(*args: object) -> bytes:
    raise RuntimeError("secret internals /etc/passwd")


def test_a_crash_is_an_openai_shaped_500_without_internals(
    base_url: str, test_key: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generation, "store", explode)  # a bug after the images were made
    response = httpx.post(
        f"{base_url}/v1/images/generations",
        json={"model": "flux-1.1-pro", "prompt": "p", "response_format": "b64_json"},
        headers={"authorization": f"Bearer {test_key}"},
    )
    assert response.status_code == 500
    request_id = response.headers["x-request-id"]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error"
    assert request_id in error["message"]
    assert "secret internals" not in response.text and "Traceback" not in response.text

    async def outcomes() -> list[tuple[str, int]]:
        engine = db.connect(settings.resolved_database_url)
        async with db.sessions(engine)() as session:
            rows = await session.scalars(select(tables.Generation))
            result = [(row.outcome, row.cost_micros) for row in rows]
        await engine.dispose()
        return result

    assert asyncio.run(outcomes()) == [("server_error", 0)]


def test_sdk_sees_413_for_a_huge_prompt(base_url: str, test_key: str) -> None:
    client = openai.OpenAI(api_key=test_key, base_url=base_url + "/v1", max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:
        client.images.generate(model="flux-1.1-pro", prompt="x" * (1024 * 1024 + 1))
    assert (caught.value.status_code, caught.value.code) == (413, "request_too_large")


def test_a_base_url_without_v1_is_told_to_add_it(base_url: str, test_key: str) -> None:
    """Not the 405 that the download route /images/{name} would give POST /images/generations."""
    client = openai.OpenAI(api_key=test_key, base_url=base_url, max_retries=0)
    calls = [
        lambda: client.images.generate(model="flux-1.1-pro", prompt="a cat"),
        lambda: client.images.edit(model="gpt-image-1.5", image=("a.png", b"x"), prompt="a hat"),
        lambda: client.models.list(),
        lambda: client.models.retrieve("dall-e-3"),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        assert caught.value.body["type"] == "invalid_request_error"  # type: ignore[index]
        assert f"the base URL must end in /v1, as in {base_url}/v1." in caught.value.message

    unknown = httpx.post(f"{base_url}/no/such/path")
    assert unknown.status_code == 404 and "/v1" not in unknown.json()["error"]["message"]
    image = httpx.get(f"{base_url}/images/img_unknown.png")
    assert image.status_code == 403  # the download route still answers: a link without its signature


def test_the_collector_goes_over_requests_in_flight_rarely(base_url: str) -> None:
    """A started app leaves the objects of requests held by a slow upstream to their end (freed when the
    request ends) instead of the collector's middle generation going over them again and again."""
    assert httpx.get(f"{base_url}/healthz").status_code == 200
    young, middle, _ = gc.get_threshold()
    assert (young, middle) == (GC_THRESHOLD, GC_MIDDLE_THRESHOLD)
    assert middle > 10  # the interpreter's default


def test_request_ids_are_unique(base_url: str) -> None:
    ids = {httpx.get(f"{base_url}/healthz").headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


def test_access_logs_never_show_image_signatures() -> None:
    import logging

    from qubax.app import hide_query

    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        "",
        0,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", "/images/img_a.png?expires=1&signature=abc", "1.1", 200),
        None,
    )
    assert hide_query(record)
    assert record.getMessage() == '127.0.0.1:5 - "GET /images/img_a.png HTTP/1.1" 200'


def test_pinned_hosts_refuse_requests_naming_any_other(settings: Settings, test_key: str) -> None:
    settings.allowed_hosts = "api.example.com, *.qubax.test"
    with serve(create_app(settings)) as url:
        for host in ("api.example.com", "API.example.com:8443", "eu.qubax.test"):
            assert httpx.get(f"{url}/healthz", headers={"host": host}).status_code == 200
        for host in ("127.0.0.1", "evil.example", "qubax.test", "api.example.com:port", "api.example.com.evil"):
            response = httpx.get(f"{url}/healthz", headers={"host": host})
            assert response.status_code == 400
            assert response.json()["error"] == {
                "message": "The Host header names a host this server does not answer for.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_host",
            }
            assert response.headers["x-request-id"].startswith("req_")
        if settings.storage_url:
            return  # S3 hands out its own presigned URLs
        # The image URLs we hand out name the allowed host the client used.
        client = openai.OpenAI(
            api_key=test_key, base_url=url + "/v1", default_headers={"host": "eu.qubax.test"}, max_retries=0
        )
        image = client.images.generate(model="flux-1-schnell", prompt="p", size="256x256").data[0]
        assert image.url is not None and image.url.startswith("http://eu.qubax.test/images/")


@pytest.mark.parametrize("patterns", ["api-*.example.com", "*example.com", "api.*.example.com"])
def test_a_host_pattern_the_check_cannot_match_stops_the_start(patterns: str) -> None:
    with pytest.raises(ValidationError, match="a pattern must be a host name or like"):
        Settings(allowed_hosts=f"api.example.com, {patterns}")
