"""Per-key limits and budgets, set with the CLI and enforced end to end through the official SDK."""

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest
from click.testing import CliRunner, Result

from qubax.app import create_app
from qubax.server.cli import main
from qubax.server.settings import Settings
from tests.conftest import cli_env, eventually
from tests.redis import fresh_redis, running_redis
from tests.server import serve
from tests.stack import Stack, client, running_stack
from tests.test_admin import add_generations, generate
from tests.test_cli import key_id


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    with running_stack(settings) as stack:
        yield stack


def qubax(settings: Settings, *args: str) -> Result:
    result = CliRunner().invoke(main, list(args), env=cli_env(settings))
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def limited_key(stack: Stack, *flags: str) -> openai.OpenAI:
    key = qubax(stack.settings, "keys", "create", *flags).stdout.strip().splitlines()[-1]
    return client(stack.url, key)


def test_requests_per_minute(stack: Stack) -> None:
    sdk = limited_key(stack, "--rpm", "2")
    raw = sdk.images.with_raw_response.generate(model="flux-1-schnell", prompt="p", size="256x256")
    assert raw.headers["x-ratelimit-limit-requests"] == "2"
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    generate(sdk)
    with pytest.raises(openai.RateLimitError) as caught:
        generate(sdk)
    error = caught.value
    assert (error.status_code, error.code, error.type) == (429, "rate_limit_exceeded", "requests")
    assert "2 per minute" in error.message
    assert 1 <= int(error.response.headers["retry-after"]) <= 60
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(stack.together.requests) == 2  # the refused request never reached an upstream


def test_images_per_day_counts_what_was_delivered(stack: Stack) -> None:
    sdk = limited_key(stack, "--images-per-day", "3")
    generate(sdk, n=2)
    with pytest.raises(openai.RateLimitError) as caught:
        generate(sdk, n=2)  # 2 + 2 > 3
    assert "3 images per day; 2 used today" in caught.value.message
    generate(sdk, n=1)


def test_monthly_budget_is_insufficient_quota(stack: Stack) -> None:
    sdk = limited_key(stack, "--monthly-budget-usd", "0.05")
    generate(sdk, model="flux-1.1-pro")  # $0.04
    with pytest.raises(openai.RateLimitError) as caught:
        generate(sdk, model="flux-1.1-pro")
    assert (caught.value.code, caught.value.type) == ("insufficient_quota", "insufficient_quota")
    assert "$0.05" in caught.value.message
    assert int(caught.value.response.headers["retry-after"]) > 0
    generate(sdk, model="flux-1-schnell")  # $0.003 still fits


def test_concurrent_requests(stack: Stack) -> None:
    sdk = limited_key(stack, "--max-concurrent", "1")
    stack.openai.delay = 2.0
    slow = threading.Thread(target=lambda: sdk.images.generate(model="dall-e-3", prompt="slow"))
    slow.start()
    while stack.openai.in_flight == 0:
        threading.Event().wait(0.01)
    with pytest.raises(openai.RateLimitError) as caught:
        generate(sdk)
    assert "1 concurrent requests" in caught.value.message
    slow.join()
    generate(sdk)  # the slot is free again


def test_update_changes_limits_on_a_running_server(stack: Stack) -> None:
    key = qubax(stack.settings, "keys", "create").stdout.strip()
    sdk = client(stack.url, key)
    generate(sdk)
    result = qubax(stack.settings, "keys", "update", key, "--rpm", "1", "--monthly-budget-usd", "12.5")
    assert result.stdout.strip().endswith(": rpm none → 1, monthly budget none → $12.50.")

    def limited() -> None:
        try:
            generate(sdk)
            generate(sdk)
        except openai.RateLimitError:
            return
        raise AssertionError("the new limit is not applied yet")

    eventually(limited)  # the key cache lets the change in within a second
    assert (
        "rpm 1 → none, monthly budget $12.50 → none."
        in qubax(stack.settings, "keys", "update", key, "--rpm", "0", "--monthly-budget-usd", "0").stdout
    )


def test_update_of_an_unknown_key_fails(settings: Settings) -> None:
    result = CliRunner().invoke(main, ["keys", "update", "key_nope", "--rpm", "3"], env=cli_env(settings))
    assert result.exit_code == 1
    assert "No such key." in result.output


def test_two_nodes_share_one_limit_through_redis(settings: Settings, redis_server: str) -> None:
    settings.redis_url = fresh_redis(redis_server)
    with running_stack(settings) as stack, serve(create_app(stack.settings)) as second_node:
        key = qubax(stack.settings, "keys", "create", "--rpm", "5").stdout.strip().splitlines()[-1]
        nodes = [client(stack.url, key), client(second_node, key)]
        answered = refused = 0
        for i in range(8):
            try:
                generate(nodes[i % 2])
                answered += 1
            except openai.RateLimitError:
                refused += 1
        assert (answered, refused) == (5, 3)


def test_two_nodes_share_one_concurrency_cap_through_redis(settings: Settings, redis_server: str) -> None:
    settings.redis_url = fresh_redis(redis_server)
    with running_stack(settings) as stack, serve(create_app(stack.settings)) as second_node:
        key = qubax(stack.settings, "keys", "create", "--max-concurrent", "1").stdout.strip().splitlines()[-1]
        stack.openai.delay = 2.0
        slow = threading.Thread(target=lambda: client(stack.url, key).images.generate(model="dall-e-3", prompt="p"))
        slow.start()
        while stack.openai.in_flight == 0:
            threading.Event().wait(0.01)
        with pytest.raises(openai.RateLimitError):
            generate(client(second_node, key))  # the slot is held on the other node
        slow.join()
        generate(client(second_node, key))


def test_limits_refuse_with_a_503_while_redis_is_down(settings: Settings) -> None:
    redis_running = contextlib.ExitStack()
    settings.redis_url = fresh_redis(redis_running.enter_context(running_redis()))
    with redis_running, running_stack(settings) as stack:
        sdk = limited_key(stack, "--rpm", "5")
        generate(sdk)
        redis_running.close()  # Redis goes away; the node stays up
        with pytest.raises(openai.InternalServerError) as caught:
            generate(sdk)
        assert (caught.value.status_code, caught.value.code) == (503, "limits_unavailable")
        assert caught.value.response.headers["retry-after"] == "1"
        assert len(stack.together.requests) == 1  # nothing reached an upstream, nothing was charged
        health = httpx.get(f"{stack.url}/healthz")  # so a load balancer takes the node out
        assert (health.status_code, health.json()["error"]["code"]) == (503, "limits_unavailable")


def burst(sdks: list[openai.OpenAI], model: str, count: int) -> tuple[int, list[openai.RateLimitError]]:
    """`count` requests at once, spread over `sdks`; returns how many were answered, and the refusals."""
    refusals: list[openai.RateLimitError] = []

    def call(i: int) -> bool:
        try:
            generate(sdks[i % len(sdks)], model=model)
            return True
        except openai.RateLimitError as error:
            refusals.append(error)
            return False

    with ThreadPoolExecutor(count) as pool:
        answered = sum(pool.map(call, range(count)))
    return answered, refusals


def test_a_burst_cannot_overshoot_the_daily_images(stack: Stack) -> None:
    sdk = limited_key(stack, "--images-per-day", "3")
    stack.together.delay = 0.5  # every request is in flight before any is recorded
    answered, refusals = burst([sdk], "flux-1-schnell", 6)
    assert (answered, len(refusals)) == (3, 3)
    assert any("in requests still running" in error.message for error in refusals)
    with pytest.raises(openai.RateLimitError):
        generate(sdk)  # and once recorded, the ledger holds the line


def test_a_burst_across_two_nodes_cannot_overshoot_the_budget(settings: Settings, redis_server: str) -> None:
    settings.redis_url = fresh_redis(redis_server)
    with running_stack(settings) as stack, serve(create_app(stack.settings)) as second_node:
        key = qubax(stack.settings, "keys", "create", "--monthly-budget-usd", "0.1").stdout.strip().splitlines()[-1]
        stack.bfl.delay = 0.5
        answered, refusals = burst([client(stack.url, key), client(second_node, key)], "flux-1.1-pro", 6)
        assert (answered, len(refusals)) == (2, 4)  # $0.04 each: two fit in $0.10, a third would not
        assert {error.code for error in refusals} == {"insufficient_quota"}


def test_images_count_from_today_and_spend_from_the_first_of_the_month(stack: Stack) -> None:
    key = qubax(stack.settings, "keys", "create", "--images-per-day", "3", "--monthly-budget-usd", "0.05")
    secret = key.stdout.strip().splitlines()[-1]
    now = datetime.now(UTC)
    yesterday = now - timedelta(days=1)
    add_generations(
        stack.settings, key_id(stack.settings, secret), [(yesterday.isoformat(), "flux-1-schnell", 3, 50_000)]
    )
    sdk = client(stack.url, secret)
    if yesterday.month != now.month:  # today is the 1st: yesterday's spend belongs to last month
        generate(sdk)
        return
    with pytest.raises(openai.RateLimitError) as caught:  # yesterday's images are not today's, its spend is
        generate(sdk)
    assert caught.value.code == "insufficient_quota"


def counting_client(stack: Stack, key: str, sent: list[str]) -> openai.OpenAI:
    """The SDK with its default retries (2), counting what reaches the server."""
    hooks = {"request": [lambda request: sent.append(request.url.path)]}
    http = httpx.Client(event_hooks=hooks)
    return openai.OpenAI(api_key=key, base_url=stack.url + "/v1", max_retries=2, http_client=http)


@pytest.mark.parametrize("flags", [("--images-per-day", "1"), ("--monthly-budget-usd", "0.05")])
def test_a_day_or_month_limit_is_not_retried_by_the_sdk(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, flags: tuple[str, str]
) -> None:
    """Retry-After stays honest (hours away), and x-should-retry: false keeps the SDK from retrying."""
    waits: list[float] = []
    monkeypatch.setattr(openai.OpenAI, "_sleep_for_retry", lambda self, **kwargs: waits.append(1))
    key = qubax(stack.settings, "keys", "create", *flags).stdout.strip().splitlines()[-1]
    sent: list[str] = []
    sdk = counting_client(stack, key, sent)
    generate(sdk, model="flux-1.1-pro", n=1)  # $0.04: the budget has no room for another
    with pytest.raises(openai.RateLimitError) as caught:
        generate(sdk, model="flux-1.1-pro", n=1)

    assert caught.value.response.headers["x-should-retry"] == "false"
    assert int(caught.value.response.headers["retry-after"]) > 60
    assert (len(sent), waits) == (2, [])


def test_a_per_minute_limit_and_a_revoked_key(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """A per-minute 429 is worth the SDK's retries (they come at once here: its sleep is skipped); a
    revoked key's 401 is not."""
    monkeypatch.setattr(openai.OpenAI, "_sleep_for_retry", lambda self, **kwargs: None)
    key = qubax(stack.settings, "keys", "create", "--rpm", "1").stdout.strip().splitlines()[-1]
    sent: list[str] = []
    sdk = counting_client(stack, key, sent)
    generate(sdk)
    with pytest.raises(openai.RateLimitError) as caught:
        generate(sdk)
    assert "x-should-retry" not in caught.value.response.headers
    assert len(sent) == 1 + 3  # the refused request and the SDK's two retries

    revoked = qubax(stack.settings, "keys", "create").stdout.strip().splitlines()[-1]
    qubax(stack.settings, "keys", "revoke", revoked)
    sent.clear()
    with pytest.raises(openai.AuthenticationError) as refused:
        generate(counting_client(stack, revoked, sent))
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert len(sent) == 1
