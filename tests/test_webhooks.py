"""Signed webhooks: a job's end told to its target (Standard Webhooks), retried until it answers 2xx."""

import asyncio
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from aiohttp.abc import AbstractResolver
from click.testing import CliRunner
from pydantic import SecretStr
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from qubax.addresses import public
from qubax.background.webhook_targets import PublicResolver, check_literal
from qubax.records import tables
from qubax.server.cli import main
from qubax.server.settings import Settings
from tests.conftest import cli_env
from tests.server import serve
from tests.stack import Stack, rows, running_stack
from tests.test_admin import TOKEN
from tests.test_jobs import ASYNC, FOX, cancel, get, submit


@dataclass
class Receiver:
    """A webhook receiver: answers with `statuses` in turn (the last repeats), records every request."""

    statuses: list[int] = field(default_factory=lambda: [200])
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        self.received.append((dict(request.headers), await request.body()))
        return Response(status_code=self.statuses[min(len(self.received), len(self.statuses)) - 1])

    def verified(self, secret: str) -> list[dict[str, Any]]:
        """Every delivery, its signature checked as a receiver checks it."""
        return [Webhook(secret).verify(body, headers) for headers, body in self.received]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    found = Receiver()
    with serve(found.app) as url:
        yield found, url + "/hook"


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    settings.admin_token = SecretStr(TOKEN)
    changes = {"webhook_allowed_hosts": "127.0.0.1", "webhook_retry_seconds": [0.05] * 7, "job_poll_seconds": 0.1}
    with running_stack(settings, providers=("bfl",), **changes) as stack:
        yield stack


def admin(stack: Stack) -> httpx.Client:
    return httpx.Client(base_url=f"{stack.url}/admin", headers={"authorization": f"Bearer {TOKEN}"})


def key_id(stack: Stack, test: bool = False) -> str:
    return next(row.id for row in rows(stack.settings, tables.ApiKey) if row.test == test)


def make_secret(stack: Stack, url: str | None = None) -> str:
    """The live key's signing secret, made through the admin API (with a default target, if given)."""
    answer = admin(stack).put(f"/keys/{key_id(stack)}/webhook", json={"url": url, "rotate_secret": True})
    assert answer.status_code == 200, answer.text
    secret: str = answer.json()["secret"]
    return secret


def wait_until(check: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def deliveries(stack: Stack) -> list[dict[str, Any]]:
    answer: list[dict[str, Any]] = admin(stack).get("/webhooks").json()["data"]
    return answer


def test_a_job_s_end_goes_to_the_key_s_target_signed(stack: Stack, receiver: tuple[Receiver, str]) -> None:
    hook, url = receiver
    env = cli_env(stack.settings) | {"QUBAX_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1"}
    done = CliRunner().invoke(main, ["keys", "webhook", stack.live_key, "--url", url], env=env)
    assert done.exit_code == 0, done.output
    assert f"webhooks to {url}." in done.stdout
    secret = done.stdout.strip().splitlines()[-1]
    assert secret.startswith("whsec_")
    job = submit(stack.live)  # names no target: the key's default
    wait_until(lambda: hook.received)
    [event] = hook.verified(secret)
    assert event["type"] == "image.job.succeeded"
    assert event["data"]["id"] == job["id"] and event["data"]["status"] == "succeeded"
    assert event["data"]["result"]["data"][0]["b64_json"]
    headers = hook.received[0][0]
    assert headers["webhook-id"].startswith("msg_") and headers["content-type"] == "application/json"
    with pytest.raises(Exception, match="signature"):
        Webhook("whsec_" + "A" * 44).verify(hook.received[0][1], headers)  # another secret: refused
    wait_until(lambda: deliveries(stack)[0]["status"] == "delivered")
    [delivery] = deliveries(stack)
    assert (delivery["job_id"], delivery["attempts"], delivery["last_status"]) == (job["id"], 1, 200)


def test_a_receiver_that_fails_three_times_gets_the_delivery(stack: Stack, receiver: tuple[Receiver, str]) -> None:
    hook, url = receiver
    hook.statuses = [500, 503, 404, 200]
    secret = make_secret(stack)
    job = submit(stack.live, extra_body={"webhook_url": url})
    wait_until(lambda: deliveries(stack) and deliveries(stack)[0]["status"] == "delivered")
    events = hook.verified(secret)
    assert len(events) == 4 and {event["data"]["id"] for event in events} == {job["id"]}
    assert len({headers["webhook-id"] for headers, _ in hook.received}) == 1  # one message, tried four times
    [delivery] = deliveries(stack)
    assert (delivery["attempts"], delivery["last_status"], delivery["last_error"]) == (4, 200, None)
    metrics = httpx.get(f"{stack.url}/metrics", headers={"authorization": f"Bearer {TOKEN}"}).text
    assert 'qubax_webhook_tries_total{outcome="retry"} 3.0' in metrics
    assert 'qubax_webhook_tries_total{outcome="delivered"} 1.0' in metrics


def test_a_delivery_gives_up_when_the_retries_run_out(settings: Settings, receiver: tuple[Receiver, str]) -> None:
    hook, url = receiver
    hook.statuses = [500]
    settings.admin_token = SecretStr(TOKEN)
    changes = {"webhook_allowed_hosts": "127.0.0.1", "webhook_retry_seconds": [0.05, 0.05], "job_poll_seconds": 0.1}
    with running_stack(settings, providers=("bfl",), **changes) as stack:
        make_secret(stack)
        submit(stack.live, extra_body={"webhook_url": url})
        wait_until(lambda: deliveries(stack) and deliveries(stack)[0]["status"] == "failed")
        [delivery] = deliveries(stack)
        assert delivery["attempts"] == 3 and delivery["last_status"] == 500
        assert delivery["last_error"] == "The target answered 500." and delivery["next_attempt_at"] is None
        assert len(hook.received) == 3


def test_a_cancelled_job_reports_too(settings: Settings, receiver: tuple[Receiver, str]) -> None:
    hook, url = receiver
    settings.admin_token = SecretStr(TOKEN)
    changes = {"webhook_allowed_hosts": "127.0.0.1", "job_concurrency": 1, "job_poll_seconds": 0.1}
    with running_stack(settings, providers=("bfl",), **changes) as stack:
        secret = make_secret(stack, url)
        stack.bfl.pending_polls = 10_000
        first, queued = submit(stack.live), submit(stack.live)
        assert cancel(stack.live, queued["id"]).json()["status"] == "cancelled"
        assert cancel(stack.live, first["id"]).json()["status"] == "cancelled"
        wait_until(lambda: len(hook.received) == 2)
    events = hook.verified(secret)
    assert {(event["type"], event["data"]["id"]) for event in events} == {
        ("image.job.cancelled", first["id"]),
        ("image.job.cancelled", queued["id"]),
    }


# IPv6 addresses that lead to a private IPv4 address: IPv4-compatible, NAT64 (the well-known prefix and
# the local-use one), 6to4 and Teredo (its client, 127.0.0.1, is the last 32 bits inverted).
IPV4_IN_IPV6 = [
    "::127.0.0.1",
    "64:ff9b::7f00:1",
    "64:ff9b::a9fe:a9fe",
    "64:ff9b:1::a00:1",
    "2002:7f00:1::",
    "2002:c0a8:1::1",
    "2001:0:4136:e378:8000:63bf:80ff:fffe",
]


@pytest.mark.parametrize(
    "target",
    [
        "https://127.0.0.1/hook",
        "https://localhost/hook",
        "https://10.1.2.3/hook",
        "https://192.168.0.10/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/hook",
        "https://[::ffff:127.0.0.1]/hook",
        *(f"https://[{address}]/hook" for address in IPV4_IN_IPV6),
        "http://example.com/hook",
        "ftp://example.com/hook",
        "/relative",
    ],
)
def test_targets_that_are_not_public_https_are_refused(settings: Settings, target: str) -> None:
    settings.admin_token = SecretStr(TOKEN)
    with running_stack(settings, providers=("bfl",)) as stack:  # no hosts allowed
        make_secret(stack)
        with pytest.raises(openai.BadRequestError) as caught:
            stack.live.images.with_raw_response.generate(**FOX, extra_body={"webhook_url": target}, extra_headers=ASYNC)  # type: ignore[arg-type]
        assert caught.value.param == "webhook_url"
        refused = admin(stack).put(f"/keys/{key_id(stack)}/webhook", json={"url": target})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "webhook_url"
        assert rows(stack.settings, tables.ImageJob) == []


@pytest.mark.parametrize("port", ["99999", "-1", "0", "http"])
def test_a_target_with_an_impossible_port_is_refused(stack: Stack, port: str) -> None:
    """A 400 naming webhook_url, not a 500, whether the host is allowed (127.0.0.1 here) or not."""
    make_secret(stack)
    for host in ("127.0.0.1", "example.com"):
        target = f"https://{host}:{port}/hook"
        with pytest.raises(openai.BadRequestError) as caught:
            stack.live.images.with_raw_response.generate(**FOX, extra_body={"webhook_url": target}, extra_headers=ASYNC)  # type: ignore[arg-type]
        assert caught.value.param == "webhook_url" and "port" in caught.value.message.lower()
        refused = admin(stack).put(f"/keys/{key_id(stack)}/webhook", json={"url": target})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "webhook_url"
    assert rows(stack.settings, tables.ImageJob) == []


def test_the_resolver_refuses_names_of_private_addresses() -> None:
    """Checked again on every connection: a name that resolves to a private address later is refused."""

    async def resolve(allowance: str | None) -> list[str]:
        resolver = PublicResolver(allowance)
        try:
            return [entry["host"] for entry in await resolver.resolve("localhost", 443)]
        finally:
            await resolver.close()

    with pytest.raises(OSError, match="non-public"):
        asyncio.run(resolve(None))
    assert "127.0.0.1" in asyncio.run(resolve("localhost"))


class OneAddress(AbstractResolver):
    """Every name resolves to one address: what a name in DNS may come to point at."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        return [
            {"hostname": host, "host": self.address, "port": port, "family": socket.AF_INET6, "proto": 0, "flags": 0}
        ]

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("address", IPV4_IN_IPV6)
def test_connections_to_ipv6_forms_of_private_ipv4_addresses_are_refused(address: str) -> None:
    """At delivery: a name that now resolves to such an address, and the address written in the URL."""

    async def resolve() -> list[Any]:
        resolver = PublicResolver(None)
        resolver.resolver = OneAddress(address)  # type: ignore[assignment]
        return await resolver.resolve("hooks.example.com", 443)

    with pytest.raises(OSError, match="non-public"):
        asyncio.run(resolve())
    with pytest.raises(OSError, match="not a public address"):
        check_literal(f"[{address}]", None)


@pytest.mark.parametrize("address", ["64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8", "2606:4700::1111"])
def test_ipv6_forms_of_public_addresses_are_public(address: str) -> None:
    assert public(address)
    check_literal(f"[{address}]", None)


def test_webhook_url_needs_a_job_and_a_secret(stack: Stack, receiver: tuple[Receiver, str]) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        stack.live.images.generate(**FOX, extra_body={"webhook_url": receiver[1]})  # type: ignore[arg-type]
    assert caught.value.param == "webhook_url"
    with pytest.raises(openai.BadRequestError) as caught:
        hook = {"webhook_url": receiver[1]}
        stack.live.images.with_raw_response.generate(**FOX, extra_body=hook, extra_headers=ASYNC)  # type: ignore[arg-type]
    assert caught.value.code == "webhook_secret_missing"
    assert rows(stack.settings, tables.ImageJob) == [] and get(stack.live).json()["data"] == []


def test_the_admin_api_shows_a_secret_only_when_it_is_made(stack: Stack, receiver: tuple[Receiver, str]) -> None:
    path = f"/keys/{key_id(stack)}/webhook"
    first = admin(stack).put(path, json={"url": receiver[1]}).json()
    assert first["secret"].startswith("whsec_") and first["has_secret"] and first["url"] == receiver[1]
    again = admin(stack).put(path, json={"url": receiver[1]}).json()
    assert again["secret"] is None and again["has_secret"]
    rotated = admin(stack).put(path, json={"url": None, "rotate_secret": True}).json()
    assert rotated["secret"] not in (None, first["secret"]) and rotated["url"] is None
    assert admin(stack).put("/keys/key_nope/webhook", json={}).status_code == 404
    assert admin(stack).put(path, json={"url": 5}).status_code == 400
    assert httpx.put(f"{stack.url}/admin{path}", json={}).status_code == 401
