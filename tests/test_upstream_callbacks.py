"""Upstream callbacks (`providers.callbacks`): with QUBAX_PUBLIC_URL set, BFL, fal and Replicate tasks
call us back when they end, and are otherwise polled only every QUBAX_CALLBACK_POLL_SECONDS.

The slow poll is set to a minute here, and each client waits 20 s at most: a request that ends did so
because its callback woke it (the fakes also count the polls: one before the callback, one after)."""

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import SecretStr

from qubax.app import create_app
from qubax.server.metrics import path_label
from qubax.server.settings import Settings
from tests.fakes.callbacks import REPLICATE_SECRET, CallingBack, signed
from tests.redis import fresh_redis
from tests.server import serve
from tests.stack import Stack, running_stack
from tests.test_jobs import submit, wait_for

UNREACHABLE = (
    "http://qubax.invalid"  # our public address as the upstream is told it; the fakes' callback_to goes around it
)
SLOW_POLL = 60.0
FOX: dict[str, Any] = {"model": "flux-1.1-pro", "prompt": "a fox", "response_format": "b64_json"}


def fake_of(stack: Stack, provider: str) -> Any:
    return getattr(stack, provider)


def polls(stack: Stack, provider: str) -> int:
    return len(fake_of(stack, provider).polls)


@pytest.fixture(params=["bfl", "fal", "replicate"])
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def stack(settings: Settings, provider: str) -> Iterator[Stack]:
    with running_stack(
        settings,
        providers=(provider,),
        public_url=UNREACHABLE,
        callback_poll_seconds=SLOW_POLL,
        replicate_webhook_secret=SecretStr(REPLICATE_SECRET),
    ) as stack:
        fake_of(stack, provider).callback_to = stack.url
        yield stack


def patient(sdk: openai.OpenAI) -> openai.OpenAI:
    return sdk.with_options(timeout=20)


def test_a_callback_ends_the_wait(stack: Stack, provider: str) -> None:
    fake: CallingBack = fake_of(stack, provider)
    image = patient(stack.live).images.generate(**FOX).data[0]
    assert image.b64_json
    [(url, status)] = fake.callbacks
    assert url.startswith(f"{stack.url}/v1/upstream-callbacks/{provider}/")
    assert status == 204
    assert polls(stack, provider) == 2  # at once, then when called back


def test_a_job_is_woken_by_its_callback(stack: Stack, provider: str) -> None:
    job = wait_for(stack.live, submit(stack.live)["id"])
    assert job["status"] == "succeeded"
    assert [status for _, status in fake_of(stack, provider).callbacks] == [204]
    assert polls(stack, provider) == 2


def test_a_lost_callback_costs_one_slow_poll(settings: Settings) -> None:
    with running_stack(settings, providers=("bfl",), public_url=UNREACHABLE, callback_poll_seconds=0.3) as stack:
        stack.bfl.drop_callbacks = True
        assert patient(stack.live).images.generate(**FOX).data[0].b64_json
        assert stack.bfl.callbacks == []
        assert len(stack.bfl.polls) >= 2


def submitted(stack: Stack, provider: str) -> list[dict[str, Any]]:
    return stack.replicate.creates if provider == "replicate" else fake_of(stack, provider).submissions


def waiting(stack: Stack, provider: str) -> tuple[str, Callable[[], Any]]:
    """A request whose task is under way and will not call back: its callback URL (at our app), and a
    join for its answer."""
    fake_of(stack, provider).drop_callbacks = True
    answers: list[Any] = []
    thread = threading.Thread(target=lambda: answers.append(patient(stack.live).images.generate(**FOX)))
    thread.start()
    deadline = time.monotonic() + 10
    while not polls(stack, provider):  # submitted and checked once: now it waits
        assert time.monotonic() < deadline
        time.sleep(0.02)

    def join() -> Any:
        thread.join(30)
        return answers[0]

    body = submitted(stack, provider)[0]
    url = str(body["webhook"] if provider == "replicate" else body["webhook_url"])
    return url.replace(UNREACHABLE, stack.url), join


@pytest.mark.parametrize("provider", ["bfl"])
def test_a_forged_callback_is_refused_and_wakes_nothing(stack: Stack, provider: str) -> None:
    url, join = waiting(stack, provider)
    prefix, ref, signature = url.rsplit("/", 2)
    forged = [
        f"{prefix}/{ref}/{signature[::-1]}",
        f"{prefix}/{ref}x/{signature}",
        f"{stack.url}/v1/upstream-callbacks/fal/{ref}/{signature}",
    ]
    for attempt in forged:
        refused = httpx.post(attempt, json={"id": "x", "status": "Ready"})
        assert refused.status_code == 401
        error = refused.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_signature"
    time.sleep(0.5)  # a wake would have had the task checked again at once
    assert len(stack.bfl.polls) == 1
    assert httpx.post(url, json={"id": "x", "status": "Ready"}).status_code == 204
    assert join().data[0].b64_json
    assert len(stack.bfl.polls) == 2


@pytest.mark.parametrize("provider", ["replicate"])
def test_a_replicate_callback_needs_replicates_signature(stack: Stack, provider: str) -> None:
    url, join = waiting(stack, provider)
    body = b'{"id": "x", "status": "succeeded"}'
    unsigned = httpx.post(url, content=body)
    assert unsigned.status_code == 401
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(int(time.time())), "webhook-signature": "v1,Zm9v"}
    assert httpx.post(url, content=body, headers=headers).status_code == 401
    time.sleep(0.5)
    assert len(stack.replicate.polls) == 1
    assert httpx.post(url, content=body, headers=signed(body)).status_code == 204  # the genuine one wakes it
    assert join().data[0].b64_json
    assert len(stack.replicate.polls) == 2


def test_a_callback_reaching_another_node_wakes_the_waiter(settings: Settings, redis_server: str) -> None:
    """Production stack: two nodes sharing a database, a signing secret and a real Redis; BFL calls
    back node B (as a load balancer might send it), and the request waiting on node A ends."""
    settings.redis_url = fresh_redis(redis_server)
    other = settings.model_copy(update={"public_url": UNREACHABLE})
    with (
        serve(create_app(other)) as node_b,
        running_stack(
            settings, providers=("bfl",), public_url=node_b, upstream_callbacks=True, callback_poll_seconds=SLOW_POLL
        ) as stack,
    ):
        assert patient(stack.live).images.generate(**FOX).data[0].b64_json
    [(url, status)] = stack.bfl.callbacks
    assert url.startswith(node_b + "/v1/upstream-callbacks/bfl/")
    assert status == 204
    assert len(stack.bfl.polls) == 2


def test_callbacks_are_counted_under_one_path_label() -> None:
    """`qubax_http_requests_total{path="/v1/upstream-callbacks"}` by status: 204 verified, 401 refused."""
    assert path_label("/v1/upstream-callbacks/bfl/ref/signature") == "/v1/upstream-callbacks"


@pytest.mark.parametrize("public_url", ["http://127.0.0.1:8000", "http://localhost:8000", "https://qubax.internal"])
def test_a_public_url_no_upstream_could_reach_leaves_tasks_polled(settings: Settings, public_url: str) -> None:
    """Image links behind a private address are no reason to wait out the slow poll on every task."""
    with running_stack(settings, providers=("bfl",), public_url=public_url, callback_poll_seconds=SLOW_POLL) as stack:
        assert patient(stack.live).images.generate(**FOX).data[0].b64_json
    assert "webhook_url" not in stack.bfl.submissions[0]
