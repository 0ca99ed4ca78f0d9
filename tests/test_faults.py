"""Fault injection, end to end: SDK → our app → fake upstreams over loopback HTTP.

Every upstream that serves flux-1.1-pro takes its turn as the FIRST route, with a healthy upstream
second (the catalog file orders them). Each fault is checked against docs/models.md "Routing and failover":
what the client sees, whether the second route is called, what the attempts ledger records, and what
is charged. The faults are knobs on the fakes, set through the `UPSTREAMS` table below.
"""

import contextlib
import io
import random
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from PIL import Image
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from qubax.records import tables
from qubax.server.settings import Settings
from tests.fakes.replicate import NSFW_ERROR
from tests.stack import Stack, rows, running_stack

pytestmark = pytest.mark.slow  # ~50 full stacks, a few of them waiting out a deadline

PRICE = 40_000  # flux-1.1-pro: $0.04 per image, in micros
Knobs = dict[str, Any]


@dataclass(frozen=True)
class Upstream:
    """How to make one fake upstream misbehave, and what it was asked for."""

    name: str  # as our error messages spell it
    refuse: Callable[[int], Knobs]  # answer every submission with this HTTP status
    out_of_credit: int  # the status an empty account answers with
    html: Knobs  # answer submissions with an HTML page (a proxy error, say)
    moderate: Knobs  # the upstream's content checker refuses the prompt
    hang: Knobs  # never finish: pending forever, or (Together, synchronous) answer after the deadline
    hand_over: Callable[[str], Knobs]  # the result image is downloaded from this URL
    asked: Callable[[Any], list[int]]  # images asked for, one entry per submission


UPSTREAMS = {
    "bfl": Upstream(
        name="Black Forest Labs",
        refuse=lambda status: {"submit_status": status},
        out_of_credit=402,
        html={"submit_html": True},
        moderate={"moderate": "Request Moderated"},
        hang={"pending_polls": 1_000_000},
        hand_over=lambda url: {"sample_url_override": url},
        asked=lambda fake: [1 for _ in fake.submissions],  # one task per image
    ),
    "fal": Upstream(
        name="fal.ai",
        refuse=lambda status: {"submit_status": status},
        out_of_credit=403,  # "User is locked. Reason: Exhausted balance."
        html={"submit_garbage": True},
        moderate={"moderate_on_submit": True},
        hang={"queued_polls": 1_000_000},
        hand_over=lambda url: {"image_url_override": url},
        asked=lambda fake: [body["num_images"] for body in fake.submissions],
    ),
    "replicate": Upstream(
        name="Replicate",
        refuse=lambda status: {"create_status": status},
        out_of_credit=402,
        html={"create_garbage": True},
        moderate={"fail": NSFW_ERROR},
        hang={"running_polls": 1_000_000},
        hand_over=lambda url: {"output_uri": lambda request, prediction, name: url},
        asked=lambda fake: [1 for _ in fake.creates],  # one prediction per image
    ),
    "together": Upstream(
        name="Together",
        refuse=lambda status: {"fail_status": status},
        out_of_credit=402,
        html={"garbage": True},
        moderate={"moderate": True},
        hang={"delay": 3.0},  # the deadline is 1 s
        hand_over=lambda url: {"return_urls": True, "publish": lambda request, data: url},
        asked=lambda fake: [body["n"] for body in fake.requests],
    ),
}
# Submissions to the asynchronous upstreams left unanswered for longer than the test's submission timeout.
STALLED_SUBMISSION: dict[str, Knobs] = {
    "bfl": {"submit_delay": 3.0},
    "fal": {"submit_delay": 3.0},
    "replicate": {"create_delay": 3.0},
}
# The healthy second route for each first one: a cycle, so every upstream is also a failover target.
SECOND = {"bfl": "fal", "fal": "replicate", "replicate": "together", "together": "bfl"}


def turn(fake: object, knobs: Knobs) -> None:
    """Set knobs on a fake, refusing names it does not have (a typo would silently test nothing)."""
    for name, value in knobs.items():
        assert hasattr(fake, name), f"{type(fake).__name__} has no knob {name!r}"
        setattr(fake, name, value)


def fail_the_second_prediction(fake: Any) -> None:
    """Replicate's second prediction ends `failed` (not moderated: not billed); the others succeed."""
    finish = fake.finish

    def failing(prediction: Any, request: Request) -> None:
        if prediction is fake.predictions[1]:
            prediction.error = "CUDA error: out of memory"
            fake.end(prediction, "failed")
        else:
            finish(prediction, request)

    turn(fake, {"finish": failing})


FAIL_ONE_OF_THREE: dict[str, Callable[[Any], None]] = {
    "bfl": lambda fake: turn(fake, {"statuses_for": {1: ["Pending", "Error"]}}),
    "replicate": fail_the_second_prediction,
}

# Faults that leave nothing billed: the whole request moves to the second route. Each names its knobs
# and what the first route's attempt records as its error.
FAILOVER_FAULTS: dict[str, tuple[Callable[[Upstream], Knobs], Callable[[Upstream], str]]] = {
    "429": (lambda up: up.refuse(429), lambda up: f"{up.name} is over its rate limit (429)"),
    "500": (lambda up: up.refuse(500), lambda up: f"{up.name} failed (500)"),
    "503": (lambda up: up.refuse(503), lambda up: f"{up.name} failed (503)"),
    "out of credit": (lambda up: up.refuse(up.out_of_credit), lambda up: f"({up.out_of_credit})"),
    "html": (lambda up: up.html, lambda up: f"{up.name} returned an unreadable response (not a JSON object)"),
}


def picture(kind: str) -> bytes:
    """A valid 256x256 image of noise (so that half of it cuts through the pixel data)."""
    noise = Image.frombytes("RGB", (256, 256), random.Random(0).randbytes(256 * 256 * 3))
    out = io.BytesIO()
    noise.save(out, kind)
    return out.getvalue()


def first_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


# What a broken upstream hands over instead of a picture, served by a separate server on 127.0.0.1
# (every fake's base URL is on 127.0.0.1 too, so our download host check lets these through).
BROKEN = {
    "result.json": (b'{"status": "Ready", "result": null}', "application/json"),
    "half.png": (first_half(picture("PNG")), "image/png"),
    "half.jpeg": (first_half(picture("JPEG")), "image/jpeg"),
}
# Not here: a PNG whose chunks are sound but whose pixel stream is cut short. imaging.intact_png_size
# explains why sound PNGs of the asked size pass through without their pixels being inflated.
SERVED = list(BROKEN)


@dataclass
class Files:
    url: str
    hits: list[str]  # paths fetched


def serve_broken(fake: Any, base_url: str) -> Files:
    """The broken files, served from the fake upstream's own origin: besides a provider's delivery hosts
    over https, the only place Qubax downloads results from."""
    hits: list[str] = []

    async def file(request: Request) -> Response:
        hits.append(request.url.path)
        data, media_type = BROKEN[request.path_params["name"]]
        return Response(data, media_type=media_type)

    fake.app.router.routes.insert(0, Route("/broken/{name}", file))
    parts = urllib.parse.urlsplit(base_url)
    return Files(f"{parts.scheme}://{parts.netloc}/broken", hits)


@contextlib.contextmanager
def pair(settings: Settings, first: str, **changes: Any) -> Iterator[tuple[Stack, Any, Any]]:
    """The stack with flux-1.1-pro routed to `first`, then to its healthy second; yields both fakes."""
    second = SECOND[first]
    catalog = f'[models."flux-1.1-pro"]\nroutes = [{{ provider = "{first}" }}, {{ provider = "{second}" }}]\n'
    with running_stack(settings, catalog=catalog, providers=(first, second), **changes) as stack:
        yield stack, getattr(stack, first), getattr(stack, second)


def generate(stack: Stack, n: int) -> tuple[str, openai.types.ImagesResponse]:
    """The route header and the response."""
    raw = stack.live.images.with_raw_response.generate(model="flux-1.1-pro", prompt="p", n=n, size="256x256")
    return raw.headers["x-qubax-route"], raw.parse()


def refused(stack: Stack, n: int = 1) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        generate(stack, n)
    return caught.value


def attempts(stack: Stack) -> list[tuple[str, int, int, str]]:
    return [(a.upstream, a.n, a.images, a.outcome) for a in rows(stack.settings, tables.Attempt)]


def charged(stack: Stack) -> list[tuple[str, int, int]]:
    return [(g.outcome, g.images, g.cost_micros) for g in rows(stack.settings, tables.Generation)]


@pytest.mark.parametrize("fault", FAILOVER_FAULTS)
@pytest.mark.parametrize("first", UPSTREAMS)
def test_a_failure_before_acceptance_moves_the_whole_request_on(settings: Settings, first: str, fault: str) -> None:
    second = SECOND[first]
    up, knobs_for, error_for = UPSTREAMS[first], *FAILOVER_FAULTS[fault]
    with pair(settings, first) as (stack, x, y):
        turn(x, knobs_for(up))
        route, response = generate(stack, n=2)
        assert route == second
        [one, _] = response.data or []
        image = Image.open(io.BytesIO(httpx.get(one.url or "").content))
        assert (image.format, image.size) == ("PNG", (256, 256))
        assert sum(up.asked(x)) == 2  # the first route was asked for everything…
        assert sum(UPSTREAMS[second].asked(y)) == 2  # …and the second made everything
        assert attempts(stack) == [(first, 2, 0, "upstream_error"), (second, 2, 2, "ok")]
        assert error_for(up) in (rows(stack.settings, tables.Attempt)[0].error or "")
        assert charged(stack) == [("ok", 2, 2 * PRICE)]


def test_fal_out_of_credit_is_its_403_exhausted_balance(settings: Settings) -> None:
    with pair(settings, "fal") as (stack, fal, _):
        turn(fal, UPSTREAMS["fal"].refuse(403))
        assert generate(stack, n=1)[0] == "replicate"
        error = rows(stack.settings, tables.Attempt)[0].error or ""
        assert "User is locked. Reason: Exhausted balance" in error


@pytest.mark.parametrize("first", UPSTREAMS)
def test_moderation_ends_the_request_at_once(settings: Settings, first: str) -> None:
    with pair(settings, first) as (stack, x, y):
        turn(x, UPSTREAMS[first].moderate)
        error = refused(stack)
        assert (error.status_code, error.code, error.type) == (400, "content_policy_violation", "invalid_request_error")
        assert UPSTREAMS[first].asked(x) == [1]
        assert UPSTREAMS[SECOND[first]].asked(y) == []
        assert attempts(stack) == [(first, 1, 0, "content_policy_violation")]
        assert charged(stack) == [("content_policy_violation", 0, 0)]


@pytest.mark.parametrize("served", SERVED)
@pytest.mark.parametrize("first", UPSTREAMS)
def test_bytes_that_are_not_a_whole_image_are_502_and_never_resubmitted(
    settings: Settings, first: str, served: str
) -> None:
    with pair(settings, first) as (stack, x, y):
        files = serve_broken(x, stack.settings.base_urls[first])
        turn(x, UPSTREAMS[first].hand_over(f"{files.url}/{served}"))
        error = refused(stack)
        assert (error.status_code, error.code) == (502, "upstream_error")
        assert error.response.headers["x-should-retry"] == "false"
        assert "not a readable image" in error.message
        assert files.hits == [f"/broken/{served}"]  # the upstream's result really was downloaded
        assert UPSTREAMS[first].asked(x) == [1]
        assert UPSTREAMS[SECOND[first]].asked(y) == []  # accepted (and billed) upstream: no second try
        # The upstream did deliver bytes; they failed to decode afterwards, so the client pays nothing.
        assert attempts(stack) == [(first, 1, 1, "ok")]
        assert charged(stack) == [("upstream_error", 0, 0)]


@pytest.mark.parametrize("first", ["bfl", "together"])
def test_a_hanging_route_opens_its_breaker_and_the_next_route_serves(settings: Settings, first: str) -> None:
    with pair(settings, first, request_timeout_seconds=1, breaker_failures=2) as (stack, x, y):
        turn(x, UPSTREAMS[first].hang)
        for _ in range(2):
            assert refused(stack).code == "upstream_timeout"
        route, _ = generate(stack, n=1)  # the breaker is open: straight to the healthy route
        assert route == SECOND[first]
        assert UPSTREAMS[first].asked(x) == [1, 1]
        assert UPSTREAMS[SECOND[first]].asked(y) == [1]
        assert [a[3] for a in attempts(stack)] == ["upstream_timeout", "upstream_timeout", "ok"]


@pytest.mark.parametrize("first", STALLED_SUBMISSION)
def test_an_unanswered_submission_fails_over_and_opens_the_breaker(settings: Settings, first: str) -> None:
    second = SECOND[first]
    with pair(settings, first, upstream_submit_timeout_seconds=0.5, breaker_failures=2) as (stack, x, y):
        turn(x, STALLED_SUBMISSION[first])
        # Had the submission not been given up at its timeout, the first route would have answered (3 s).
        assert [generate(stack, n=1)[0] for _ in range(3)] == [second] * 3
        assert UPSTREAMS[first].asked(x) == [1, 1]  # the breaker opened: the third request skipped it
        assert UPSTREAMS[second].asked(y) == [1, 1, 1]
        outcomes = [(a[0], a[3]) for a in attempts(stack)]
        timed_out, served = (first, "upstream_timeout"), (second, "ok")
        assert outcomes == [timed_out, served, timed_out, served, served]
        assert charged(stack) == [("ok", 1, PRICE)] * 3


@pytest.mark.parametrize("first", UPSTREAMS)
def test_an_upstream_that_never_finishes_is_504_at_the_one_deadline(settings: Settings, first: str) -> None:
    with pair(settings, first, request_timeout_seconds=1) as (stack, x, y):
        turn(x, UPSTREAMS[first].hang)
        started = time.monotonic()
        error = refused(stack)
        assert 1.0 <= time.monotonic() - started < 2.5
        assert (error.status_code, error.code) == (504, "upstream_timeout")
        assert error.response.headers["x-should-retry"] == "false"
        assert UPSTREAMS[first].asked(x) == [1]
        assert UPSTREAMS[SECOND[first]].asked(y) == []  # one deadline per request, not one per route
        assert attempts(stack) == [(first, 1, 0, "upstream_timeout")]  # the route's failure, for its breaker
        assert charged(stack) == [("upstream_timeout", 0, 0)]
        # The work we own upstream is taken back where the upstream has a way to (docs/models.md).
        if first == "fal":
            assert x.cancels == [x.requests[0].id]
        elif first == "replicate":
            assert x.cancels == [x.predictions[0].id]


@pytest.mark.parametrize("first", FAIL_ONE_OF_THREE)
def test_a_partial_fan_out_keeps_its_images_and_the_second_route_makes_the_rest(settings: Settings, first: str) -> None:
    second = SECOND[first]
    with pair(settings, first) as (stack, x, y):
        FAIL_ONE_OF_THREE[first](x)
        route, response = generate(stack, n=3)
        assert route == f"{first}+{second}"
        assert len(response.data or []) == 3
        assert UPSTREAMS[first].asked(x) == [1, 1, 1]
        assert UPSTREAMS[second].asked(y) == [1]  # only the missing image
        assert attempts(stack) == [(first, 3, 2, "upstream_error"), (second, 1, 1, "ok")]
        assert charged(stack) == [("ok", 3, 3 * PRICE)]
        [generation] = rows(stack.settings, tables.Generation)
        assert generation.upstream == f"{first}+{second}"


@pytest.mark.parametrize("first", UPSTREAMS)
def test_when_every_route_fails_the_last_error_is_502_worth_retrying(settings: Settings, first: str) -> None:
    second = SECOND[first]
    with pair(settings, first) as (stack, x, y):
        turn(x, UPSTREAMS[first].refuse(500))
        turn(y, UPSTREAMS[second].refuse(500))
        error = refused(stack)
        assert (error.status_code, error.code) == (502, "upstream_error")
        assert error.response.headers["x-should-retry"] == "true"
        assert f"{UPSTREAMS[second].name} failed (500)" in error.message  # the last route's error
        assert attempts(stack) == [(first, 1, 0, "upstream_error"), (second, 1, 0, "upstream_error")]
        assert charged(stack) == [("upstream_error", 0, 0)]
