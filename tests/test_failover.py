"""Failover, breakers, caps and cancellation, end to end: SDK → our app → fake upstreams over HTTP.

flux-1.1-pro is served by BFL first and Together last in these tests (fal and Replicate are not
configured), so Together is where a failing BFL hands its work.
"""

import asyncio
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from qubax.records import tables
from qubax.server.settings import Settings
from tests.stack import Stack, rows, running_stack


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    with running_stack(settings) as stack:
        yield stack


def attempts(stack: Stack) -> list[tuple[str, int, int, str]]:
    return [(a.upstream, a.n, a.images, a.outcome) for a in rows(stack.settings, tables.Attempt)]


def charged(stack: Stack) -> list[tuple[str, int, int]]:
    return [(g.outcome, g.images, g.cost_micros) for g in rows(stack.settings, tables.Generation)]


def generate(stack: Stack, n: int = 1) -> openai.types.ImagesResponse:
    raw = stack.live.images.with_raw_response.generate(model="flux-1.1-pro", prompt="p", n=n, size="256x256")
    response = raw.parse()
    response.route = raw.headers["x-qubax-route"]  # type: ignore[attr-defined]
    return response


@pytest.mark.parametrize(
    ("fault", "value"),
    [
        ("submit_status", 429),
        ("submit_status", 500),
        ("submit_status", 503),
        ("submit_status", 402),
        ("submit_status", 401),
        ("submit_response", {"unexpected": True}),
    ],
)
def test_retryable_failures_move_to_the_next_route(stack: Stack, fault: str, value: object) -> None:
    setattr(stack.bfl, fault, value)
    response = generate(stack, n=2)
    assert response.route == "together"  # type: ignore[attr-defined]
    assert len(response.data) == 2
    assert [body["n"] for body in stack.together.requests] == [2]
    assert [(a[0], a[2], a[3]) for a in attempts(stack)] == [("bfl", 0, "upstream_error"), ("together", 2, "ok")]
    assert charged(stack) == [("ok", 2, 80_000)]


def test_html_instead_of_json_moves_on(stack: Stack) -> None:
    stack.bfl.submit_html = True  # a captive portal or a misrouted proxy answering for BFL
    response = generate(stack)
    assert response.route == "together"  # type: ignore[attr-defined]
    assert stack.bfl.polls == []


def test_a_failed_task_is_not_billed_so_it_moves_on(stack: Stack) -> None:
    stack.bfl.status_sequence = ["Pending", "Error"]
    response = generate(stack)
    assert response.route == "together"  # type: ignore[attr-defined]
    assert attempts(stack) == [("bfl", 1, 0, "upstream_error"), ("together", 1, 1, "ok")]


@pytest.mark.parametrize(
    ("fault", "value"),
    [("poll_garbage", True), ("download_status", 404), ("download_status", 503)],
)
def test_failures_after_acceptance_never_resubmit(stack: Stack, fault: str, value: object) -> None:
    setattr(stack.bfl, fault, value)
    with pytest.raises(openai.InternalServerError) as caught:
        generate(stack)
    assert caught.value.status_code == 502
    assert stack.together.requests == []  # BFL may have billed the task: no second one elsewhere
    assert charged(stack) == [("upstream_error", 0, 0)]


def test_moderation_ends_the_request_at_once(stack: Stack) -> None:
    stack.bfl.moderate = "Content Moderated"
    with pytest.raises(openai.BadRequestError) as caught:
        generate(stack)
    assert caught.value.code == "content_policy_violation"
    assert stack.together.requests == []
    assert attempts(stack) == [("bfl", 1, 0, "content_policy_violation")]


def test_when_every_route_fails_the_last_error_is_returned(stack: Stack) -> None:
    stack.bfl.submit_status = 500
    stack.together.fail_status = 503
    with pytest.raises(openai.InternalServerError) as caught:
        generate(stack)
    assert caught.value.status_code == 502
    assert caught.value.response.headers["x-should-retry"] == "true"
    assert "Together" in caught.value.message
    assert charged(stack) == [("upstream_error", 0, 0)]


def test_breaker_skips_a_failing_route_then_probes_it_after_the_cooldown(settings: Settings) -> None:
    with running_stack(settings, breaker_failures=2, breaker_cooldown_seconds=1.0) as stack:
        stack.bfl.submit_status = 500
        for _ in range(2):
            assert generate(stack).route == "together"  # type: ignore[attr-defined]
        assert len(stack.bfl.submissions) == 2 and len(attempts(stack)) == 4
        stack.bfl.submit_status = None  # BFL recovers, but its breaker is open
        assert generate(stack).route == "together"  # type: ignore[attr-defined]
        assert len(stack.bfl.submissions) == 2  # skipped, not tried
        assert [a[0] for a in attempts(stack)][-2:] == ["together", "together"]
        time.sleep(1.1)
        assert generate(stack).route == "bfl"  # type: ignore[attr-defined]  # the probe, and it closes
        assert generate(stack).route == "bfl"  # type: ignore[attr-defined]


def test_every_route_cooling_down_is_503_with_retry_after(settings: Settings) -> None:
    with running_stack(settings, breaker_failures=1, breaker_cooldown_seconds=30) as stack:
        stack.openai.fail_status = 500
        with pytest.raises(openai.InternalServerError):
            stack.live.images.generate(model="dall-e-3", prompt="p")
        with pytest.raises(openai.APIStatusError) as caught:
            stack.live.images.generate(model="dall-e-3", prompt="p")
        assert caught.value.status_code == 503
        assert caught.value.code == "upstream_unavailable"
        assert 1 <= int(caught.value.response.headers["retry-after"]) <= 30
        assert len(stack.openai.requests) == 1  # the gpt-image-2 route stands in only for "not served"


def test_concurrency_cap_holds_under_100_concurrent_requests(settings: Settings) -> None:
    with running_stack(settings, catalog="[providers.openai]\nconcurrency = 3\n") as stack:
        stack.openai.delay = 0.05

        async def hundred() -> list[openai.types.ImagesResponse]:
            client = openai.AsyncOpenAI(api_key=stack.live_key, base_url=stack.url + "/v1", max_retries=0)
            calls = (
                client.images.generate(model="dall-e-3", prompt=f"p{i}", response_format="b64_json") for i in range(100)
            )
            try:
                return await asyncio.gather(*calls)
            finally:
                await client.close()

        responses = asyncio.run(hundred())
        assert len(responses) == 100 and all(len(r.data) == 1 for r in responses)
        assert len(stack.openai.requests) == 100
        assert stack.openai.peak == 3  # excess work waited its turn instead of collecting 429s
        assert [g.outcome for g in rows(stack.settings, tables.Generation)] == ["ok"] * 100


def test_a_client_that_disconnects_cancels_the_upstream_work(stack: Stack) -> None:
    stack.bfl.pending_polls = 10_000
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{stack.url}/v1/images/generations",
            json={"model": "flux-1.1-pro", "prompt": "p", "n": 2},
            headers={"authorization": f"Bearer {stack.live_key}"},
            timeout=0.5,
        )
    deadline = time.monotonic() + 10
    while not rows(stack.settings, tables.Generation) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert charged(stack) == [("client_disconnected", 0, 0)]
    assert attempts(stack) == [("bfl", 2, 0, "cancelled")]
    time.sleep(0.05)  # polls already on the wire when the work was cancelled may still land
    polls = len(stack.bfl.polls)
    time.sleep(0.2)  # twenty poll intervals: polling that was not cancelled would show up here
    assert len(stack.bfl.polls) == polls


def test_an_unreachable_route_moves_on(settings: Settings) -> None:
    # Port 9 (discard) is closed on loopback: the connection is refused before anything is sent.
    with running_stack(settings, base_urls={"bfl": "http://127.0.0.1:9"}) as stack:
        assert generate(stack).route == "together"  # type: ignore[attr-defined]
        assert attempts(stack)[0] == ("bfl", 1, 0, "upstream_error")
