"""`Idempotency-Key`: a request sent again gets the first answer, with one upstream call and one charge."""

import concurrent.futures
import json
from datetime import datetime, timedelta
from typing import Any

import httpx
import openai
import pytest

from qubax.api.routes import GENERATIONS_PATH
from qubax.pipeline import claims, idempotency
from qubax.providers.pool import KeyPool
from qubax.records import journal, tables
from qubax.server.settings import Settings
from tests.stack import Stack, add, rows, running_stack
from tests.test_upstreams import picture


@pytest.fixture
def stack(settings: Settings) -> "Stack":
    with running_stack(settings, providers=("bfl",)) as stack:
        yield stack  # type: ignore[misc]


def charged(stack: Stack) -> list[tuple[str, int, int]]:
    return [(row.outcome, row.images, row.cost_micros) for row in rows(stack.settings, tables.Generation)]


def test_the_same_request_twice_is_made_once_and_charged_once(stack: Stack) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = stack.live.images.with_raw_response.generate(
        model="flux-1.1-pro", prompt="a fox", response_format="b64_json", extra_headers=headers
    )
    again = stack.live.images.with_raw_response.generate(
        model="flux-1.1-pro", prompt="a fox", response_format="b64_json", extra_headers=headers
    )
    assert again.parse().data[0].b64_json == first.parse().data[0].b64_json
    assert again.headers["x-qubax-idempotent-replayed"] == "true"
    assert again.headers["x-qubax-route"] == first.headers["x-qubax-route"] == "bfl"
    assert "x-qubax-idempotent-replayed" not in first.headers
    assert len(stack.bfl.submissions) == 1
    assert charged(stack) == [("ok", 1, 40_000)]


def test_another_request_with_the_same_key_is_a_400(stack: Stack) -> None:
    headers = {"Idempotency-Key": "order-43"}
    stack.live.images.generate(model="flux-1.1-pro", prompt="a fox", extra_headers=headers)
    with pytest.raises(openai.BadRequestError) as caught:
        stack.live.images.generate(model="flux-1.1-pro", prompt="a cat", extra_headers=headers)
    assert caught.value.code == "idempotency_key_reused"
    assert len(stack.bfl.submissions) == 1


def test_a_key_longer_than_255_characters_is_a_400(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        stack.live.images.generate(model="flux-1.1-pro", prompt="a fox", extra_headers={"Idempotency-Key": "k" * 256})
    assert caught.value.code == "invalid_idempotency_key"
    assert stack.bfl.submissions == []


def test_keys_are_per_api_key(stack: Stack, settings: Settings) -> None:
    """Another API key's request under the same Idempotency-Key is its own request."""
    from tests.conftest import create_key

    other = openai.OpenAI(api_key=create_key(settings), base_url=stack.url + "/v1", max_retries=0)
    headers = {"Idempotency-Key": "shared"}
    stack.live.images.generate(model="flux-1.1-pro", prompt="a fox", extra_headers=headers)
    other.images.generate(model="flux-1.1-pro", prompt="a cat", extra_headers=headers)
    assert len(stack.bfl.submissions) == 2


def test_the_sdk_retrying_after_its_timeout_gets_the_first_outcome(stack: Stack) -> None:
    """The client gives up on the first try; the work goes on, and the SDK's own retries (same headers)
    wait for it or replay it: one upstream task, one charge."""
    stack.bfl.pending_polls = 80  # about a second of work
    client = openai.OpenAI(api_key=stack.live_key, base_url=stack.url + "/v1", timeout=0.3, max_retries=6)
    response = client.images.generate(
        model="flux-1.1-pro", prompt="a fox", response_format="b64_json", extra_headers={"Idempotency-Key": "slow"}
    )
    assert response.data[0].b64_json
    assert len(stack.bfl.submissions) == 1
    assert charged(stack) == [("ok", 1, 40_000)]


def test_concurrent_copies_wait_for_the_first(stack: Stack) -> None:
    stack.bfl.pending_polls = 30
    headers = {"Idempotency-Key": "burst"}

    def send() -> str:
        response = stack.live.images.generate(
            model="flux-1.1-pro", prompt="a fox", response_format="b64_json", extra_headers=headers
        )
        return response.data[0].b64_json or ""

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: send(), range(4)))
    assert len(set(answers)) == 1 and answers[0]
    assert len(stack.bfl.submissions) == 1
    assert charged(stack) == [("ok", 1, 40_000)]


def test_a_failure_lets_go_of_the_key_so_a_retry_does_the_work(stack: Stack) -> None:
    headers = {"Idempotency-Key": "flaky"}
    stack.bfl.submit_status = 503
    with pytest.raises(openai.APIStatusError):
        stack.live.images.generate(model="flux-1.1-pro", prompt="a fox", extra_headers=headers)
    stack.bfl.submit_status = None
    assert stack.live.images.generate(model="flux-1.1-pro", prompt="a fox", extra_headers=headers).data
    assert [outcome for outcome, _, _ in charged(stack)] == ["upstream_error", "ok"]
    assert len(stack.bfl.submissions) == 2  # the failure might pass: the retry went upstream again


@pytest.mark.parametrize(
    ("refuse", "status", "code"),
    [
        ({"moderate": "Request Moderated"}, 400, "content_policy_violation"),
        ({"submit_status": 400}, 502, "upstream_error"),  # the upstream refused the request itself
    ],
)
def test_a_deterministic_refusal_is_kept_and_replayed(
    stack: Stack, refuse: dict[str, Any], status: int, code: str
) -> None:
    """The same request would be refused again: its retry gets the refusal without an upstream call."""
    for name, value in refuse.items():
        setattr(stack.bfl, name, value)
    body = {"model": "flux-1.1-pro", "prompt": "a fox"}
    headers = {"authorization": f"Bearer {stack.live_key}", "idempotency-key": "refused-once"}
    first = httpx.post(f"{stack.url}/v1/images/generations", json=body, headers=headers)
    again = httpx.post(f"{stack.url}/v1/images/generations", json=body, headers=headers)
    assert (first.status_code, first.json()["error"]["code"]) == (status, code)
    assert (again.status_code, again.json()) == (first.status_code, first.json())
    assert again.headers["x-qubax-idempotent-replayed"] == "true"
    assert again.headers.get("x-should-retry") == first.headers.get("x-should-retry")
    assert len(stack.bfl.submissions) == 1
    assert [outcome for outcome, _, _ in charged(stack)] == [code]  # recorded once, charged nothing


def test_a_replayed_link_is_signed_anew_and_works(stack: Stack) -> None:
    headers = {"Idempotency-Key": "linked"}
    stack.live.images.generate(model="flux-1.1-pro", prompt="a fox", response_format="url", extra_headers=headers)
    again = stack.live.images.generate(
        model="flux-1.1-pro", prompt="a fox", response_format="url", extra_headers=headers
    )
    url = again.data[0].url or ""
    assert "signature=" in url.lower() and httpx.get(url).status_code == 200  # S3 signs as X-Amz-Signature


def test_an_edit_sent_twice_is_made_once_and_another_file_is_another_request(stack: Stack) -> None:
    headers = {"Idempotency-Key": "edit-1"}
    mask = picture(64, 64, mode="RGBA")
    for _ in range(2):
        stack.live.images.edit(
            model="flux-1-fill-pro",
            image=("a.png", picture(64, 64)),
            mask=("m.png", mask),
            prompt="a door",
            extra_headers=headers,
        )
    assert len(stack.bfl.submissions) == 1
    with pytest.raises(openai.BadRequestError) as caught:
        stack.live.images.edit(
            model="flux-1-fill-pro",
            image=("a.png", picture(64, 32)),
            mask=("m.png", picture(64, 32, mode="RGBA")),
            prompt="a door",
            extra_headers=headers,
        )
    assert caught.value.code == "idempotency_key_reused"


def test_work_abandoned_by_a_dead_node_is_taken_over(stack: Stack) -> None:
    """A claim whose worker stopped saying it is alive (its node died) is taken over by the retry."""
    body = {"model": "flux-1.1-pro", "prompt": "a fox"}
    key_id = next(row.id for row in rows(stack.settings, tables.ApiKey) if not row.test)
    fingerprint = idempotency.fingerprint(GENERATIONS_PATH, body)

    add(stack.settings, abandoned(stack, key_id, "orphan", fingerprint))
    response = stack.live.images.generate(**body, extra_headers={"Idempotency-Key": "orphan"})  # type: ignore[arg-type]
    assert response.data and len(stack.bfl.submissions) == 1
    [row] = rows(stack.settings, tables.IdempotentRequest)
    assert row.status == "done"


def streamed(stack: Stack, token: str) -> tuple[list[Any], dict[str, str]]:
    """A streamed generation with the SDK: its events and the answer's headers."""
    with stack.live.images.with_streaming_response.generate(
        model="flux-1.1-pro", prompt="a fox", n=2, stream=True, extra_headers={"Idempotency-Key": token}
    ) as response:
        return list(response.parse()), dict(response.headers)


def test_a_streamed_request_sent_twice_is_made_once(stack: Stack) -> None:
    first, first_headers = streamed(stack, "stream-1")
    again, again_headers = streamed(stack, "stream-1")
    assert [event.type for event in first] == ["image_generation.completed"] * 2
    assert [event.b64_json for event in again] == [event.b64_json for event in first]
    assert again_headers["x-qubax-idempotent-replayed"] == "true" and "x-qubax-idempotent-replayed" not in first_headers
    assert again_headers["content-type"].startswith("text/event-stream")
    assert len(stack.bfl.submissions) == 2  # one task per image, once
    assert charged(stack) == [("ok", 2, 80_000)]


def test_a_stream_goes_on_when_its_client_leaves_and_its_retry_gets_it_all(stack: Stack) -> None:
    stack.bfl.pending_polls = 100  # about a second of work
    body = {"model": "flux-1.1-pro", "prompt": "a fox", "stream": True}
    headers = {"authorization": f"Bearer {stack.live_key}", "idempotency-key": "left"}
    with httpx.stream("POST", f"{stack.url}/v1/images/generations", json=body, headers=headers) as response:
        assert response.status_code == 200  # admitted; the client leaves before any event
    events, _ = streamed_once(stack, body, headers)
    assert [event["type"] for event in events] == ["image_generation.completed"]
    assert len(stack.bfl.submissions) == 1
    assert charged(stack) == [("ok", 1, 40_000)]


def streamed_once(stack: Stack, body: dict[str, Any], headers: dict[str, str]) -> tuple[list[Any], httpx.Response]:
    response = httpx.post(f"{stack.url}/v1/images/generations", json=body, headers=headers, timeout=30)
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    return events, response


def test_a_stream_that_delivered_nothing_lets_go_of_its_key(stack: Stack) -> None:
    stack.bfl.moderate = "Request Moderated"
    body = {"model": "flux-1.1-pro", "prompt": "a fox", "stream": True}
    headers = {"authorization": f"Bearer {stack.live_key}", "idempotency-key": "refused"}
    events, _ = streamed_once(stack, body, headers)
    assert events[-1]["error"]["code"] == "content_policy_violation"
    stack.bfl.moderate = None
    events, response = streamed_once(stack, body, headers)
    assert [event["type"] for event in events] == ["image_generation.completed"]
    assert "x-qubax-idempotent-replayed" not in response.headers
    assert len(stack.bfl.submissions) == 2


def test_a_request_recorded_by_a_node_that_died_before_keeping_it_is_charged_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The crash window: a node commits the request's usage record, then dies before it stores the
    answer. The retry that takes the request over makes it again, and records nothing more."""
    died: list[str] = []

    async def dies_the_first_time(*args: Any) -> None:
        if not died:
            died.append("died")
            raise RuntimeError("the node died")  # its heartbeat stopped before: the request is abandoned
        await keep(*args)

    keep = idempotency.keep
    monkeypatch.setattr("qubax.pipeline.idempotency.keep", dies_the_first_time)
    with running_stack(settings, providers=("bfl",), takeover_seconds=2.0) as stack:
        body = {"model": "flux-1.1-pro", "prompt": "a fox", "response_format": "b64_json"}
        headers = {"authorization": f"Bearer {stack.live_key}", "idempotency-key": "crash-window"}
        first = httpx.post(f"{stack.url}/v1/images/generations", json=body, headers=headers, timeout=30)
        assert first.status_code == 500 and died
        again = httpx.post(f"{stack.url}/v1/images/generations", json=body, headers=headers, timeout=30)
        assert again.status_code == 200 and again.json()["data"][0]["b64_json"]
        assert charged(stack) == [("ok", 1, 40_000)]  # one usage row, charged once


def test_a_takeover_waits_on_the_upstream_task_the_dead_node_started(stack: Stack) -> None:
    """The dead node had noted its BFL task in the journal: the retry polls that task and submits nothing."""
    body = {"model": "flux-1.1-pro", "prompt": "a fox", "response_format": "b64_json"}
    key_id = next(row.id for row in rows(stack.settings, tables.ApiKey) if not row.test)
    fingerprint = idempotency.fingerprint(GENERATIONS_PATH, body)
    task, task_id = bfl_task_of_a_dead_node(stack, journal.request_owner(key_id, "died"))
    add(stack.settings, abandoned(stack, key_id, "died", fingerprint), task)
    response = stack.live.images.generate(**body, extra_headers={"Idempotency-Key": "died"})  # type: ignore[arg-type]
    assert response.data[0].b64_json
    assert len(stack.bfl.submissions) == 1  # the dead node's, and no other
    assert stack.bfl.polls and set(stack.bfl.polls) == {task_id}
    assert charged(stack) == [("ok", 1, 40_000)]
    assert rows(stack.settings, tables.UpstreamTask) == []  # forgotten once the request is done


def silent_since(stack: Stack) -> datetime:
    """When a node that has since died was last heard of."""
    return tables.now() - timedelta(seconds=stack.settings.takeover_seconds + 1)


def abandoned(stack: Stack, key_id: str, token: str, fingerprint: str) -> tables.IdempotentRequest:
    """An idempotent request whose node died at work on it."""
    silent = silent_since(stack)
    return tables.IdempotentRequest(
        key_id=key_id,
        idempotency_key=token,
        fingerprint=fingerprint,
        status="running",
        created_at=silent,
        heartbeat_at=silent,
        expires_at=silent + claims.LIFETIME,
    )


def bfl_task_of_a_dead_node(stack: Stack, owner: str) -> tuple[tables.UpstreamTask, str]:
    """A task submitted to the fake BFL by a node that died waiting on it, and its journal note."""
    submitted = httpx.post(
        f"{stack.settings.base_urls['bfl']}/v1/flux-pro-1.1",
        headers={"x-key": "test-key"},
        json={"prompt": "a fox", "width": 1024, "height": 1024, "output_format": "png"},
    ).json()
    handle = {
        "polling_url": submitted["polling_url"],
        "key": KeyPool(["test-key"], scope="upstream:bfl").name_of("test-key"),
    }
    note = tables.UpstreamTask(
        owner=owner, provider="bfl", upstream_model="flux-pro-1.1", images=1, handle=json.dumps(handle),
        created_at=silent_since(stack),
    )  # fmt: skip
    return note, submitted["id"]
