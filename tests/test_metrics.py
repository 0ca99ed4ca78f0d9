"""`GET /metrics`, end to end: the SDK → our app → fake upstreams, then a scrape read with Prometheus'
own parser. flux-1.1-pro goes to BFL first and Together next; dall-e-3 goes to the fake OpenAI."""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from qubax.app import create_app
from qubax.server.metrics import Metrics
from qubax.server.settings import Settings
from tests.conftest import eventually
from tests.server import serve
from tests.stack import Stack, running_stack

ADMIN_TOKEN = "admin-secret-token-0123456789abcdef"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    with running_stack(settings, admin_token=SecretStr(ADMIN_TOKEN)) as stack:
        yield stack


def scrape(stack: Stack) -> Samples:
    response = httpx.get(f"{stack.url}/metrics", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return parse(response.text)


def parse(exposition: str) -> Samples:
    families = text_string_to_metric_families(exposition)
    return {(s.name, frozenset(s.labels.items())): s.value for family in families for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` that has these labels, whatever its others."""
    wanted = set(labels.items())
    return sum(v for (sample, have), v in samples.items() if sample == name and wanted <= have)


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(labels)[label] for sample, labels in samples if sample == name}


def test_generations_upstreams_images_and_cost(stack: Stack) -> None:
    for _ in range(2):
        stack.live.images.generate(model="dall-e-3", prompt="a secret prompt")
    stack.bfl.submit_status = 500  # BFL fails before accepting: Together takes all three images
    stack.live.images.generate(model="flux-1.1-pro", prompt="p", n=3, size="256x256")
    stack.openai.fail_status = 500
    with pytest.raises(openai.InternalServerError):
        stack.live.images.generate(model="dall-e-3", prompt="p")
    stack.test.images.generate(model="flux-1.1-pro", prompt="p")  # a test key: no upstream, no cost

    samples = scrape(stack)
    generations = "qubax_generations_total"
    assert value(samples, generations, model="dall-e-3", route="openai", outcome="ok") == 2
    assert value(samples, generations, model="dall-e-3", route="none", outcome="upstream_error") == 1
    assert value(samples, generations, model="flux-1.1-pro", route="together", outcome="ok") == 1
    assert value(samples, generations, model="flux-1.1-pro", route="test", outcome="ok") == 1
    assert total(samples, generations) == 5
    duration = "qubax_generation_duration_seconds_count"
    assert value(samples, duration, model="dall-e-3", route="openai") == 2
    assert value(samples, duration, model="dall-e-3", route="none") == 1
    assert value(samples, "qubax_images_total", model="dall-e-3", route="openai") == 2
    assert value(samples, "qubax_images_total", model="flux-1.1-pro", route="together") == 3
    assert value(samples, "qubax_images_total", model="flux-1.1-pro", route="test") == 1
    assert value(samples, "qubax_cost_usd_total", model="dall-e-3") == pytest.approx(0.08)  # $0.04 each
    assert value(samples, "qubax_cost_usd_total", model="flux-1.1-pro") == pytest.approx(0.12)

    attempts = "qubax_upstream_attempts_total"
    assert value(samples, attempts, upstream="openai", outcome="ok") == 2
    assert value(samples, attempts, upstream="openai", outcome="upstream_error") == 1
    assert value(samples, attempts, upstream="bfl", outcome="upstream_error") == 1
    assert value(samples, attempts, upstream="together", outcome="ok") == 1
    assert value(samples, "qubax_upstream_duration_seconds_count", upstream="openai") == 3
    assert value(samples, "qubax_upstream_duration_seconds_count", upstream="bfl") == 1
    errors = "qubax_upstream_errors_total"
    assert value(samples, errors, upstream="openai", code="upstream_error") == 1
    assert value(samples, errors, upstream="bfl", code="upstream_error") == 1
    assert label_values(samples, errors, "upstream") == {"openai", "bfl"}  # Together never failed

    def http_counts() -> None:
        samples = scrape(stack)
        path = "/v1/images/generations"
        assert value(samples, "qubax_http_requests_total", method="POST", path=path, status="200") == 4
        assert value(samples, "qubax_http_requests_total", method="POST", path=path, status="502") == 1
        assert value(samples, "qubax_http_requests_total", method="GET", path="/metrics", status="200") >= 1

    eventually(http_counts)


def test_prompts_and_keys_never_appear(stack: Stack) -> None:
    stack.live.images.generate(model="dall-e-3", prompt="a very private prompt")
    response = httpx.get(f"{stack.url}/metrics", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert "private" not in response.text
    assert stack.live_key not in response.text and ADMIN_TOKEN not in response.text


def test_path_labels_stay_bounded(stack: Stack) -> None:
    for i in range(5):
        httpx.get(f"{stack.url}/images/img_{i}abc.png?expires=1&signature=x")
        httpx.get(f"{stack.url}/v1/models/model-{i}", headers={"authorization": f"Bearer {stack.live_key}"})
        httpx.get(f"{stack.url}/no/such/path/{i}")
        httpx.get(f"{stack.url}/v1/images/jobs/job_{i}", headers={"authorization": f"Bearer {stack.live_key}"})
    httpx.post(f"{stack.url}/v1/models", headers={"authorization": f"Bearer {stack.live_key}"})

    def bounded() -> None:
        samples = scrape(stack)
        name = "qubax_http_requests_total"
        assert label_values(samples, name, "path") == {"/images", "/v1/models", "/v1/images/jobs", "other"}
        assert value(samples, name, method="GET", path="/v1/images/jobs", status="404") == 5
        assert total(samples, name, method="GET", path="/images") == 5  # refused: bad signatures
        assert value(samples, name, method="GET", path="/v1/models", status="404") == 5
        assert value(samples, name, method="GET", path="other", status="404") == 5
        assert value(samples, name, method="POST", path="/v1/models", status="405") == 1

    eventually(bounded)


def test_a_missing_or_wrong_token_is_401_and_an_api_key_is_no_token(stack: Stack) -> None:
    wrong = [
        b"Bearer wrong-token",
        f"Basic {ADMIN_TOKEN}".encode(),
        b"Bearer \xe4",
        f"Bearer {stack.live_key}".encode(),
    ]
    for headers in [{}, *({b"authorization": header} for header in wrong)]:
        response = httpx.get(f"{stack.url}/metrics", headers=headers)
        assert response.status_code == 401
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert "qubax_" not in response.text and stack.live_key not in response.text


@pytest.mark.parametrize("admin_token", [None, ""])
def test_without_an_admin_token_there_is_no_metrics_endpoint(settings: Settings, admin_token: str | None) -> None:
    settings.admin_token = None if admin_token is None else SecretStr(admin_token)
    with serve(create_app(settings)) as url:
        for headers in ({}, {"authorization": "Bearer"}, {"authorization": "Bearer anything"}):
            response = httpx.get(f"{url}/metrics", headers=headers)
            assert response.status_code == 404
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_histogram_buckets_count_up_to_and_including_their_bound() -> None:
    metrics = Metrics()
    for seconds in (0.05, 0.07, 400.0):  # on the first bound, inside the second, beyond the last
        metrics.upstream_duration.observe(("bfl",), seconds)
    metrics.count_response("POST", "/v1/images/generations", 200)
    samples = parse(metrics.exposition().decode())
    bucket = "qubax_upstream_duration_seconds_bucket"
    assert value(samples, bucket, upstream="bfl", le="0.05") == 1
    assert value(samples, bucket, upstream="bfl", le="0.1") == 2
    assert value(samples, bucket, upstream="bfl", le="300.0") == 2
    assert value(samples, bucket, upstream="bfl", le="+Inf") == 3
    assert value(samples, "qubax_upstream_duration_seconds_count", upstream="bfl") == 3
    assert value(samples, "qubax_upstream_duration_seconds_sum", upstream="bfl") == pytest.approx(400.12)
    labels = {"method": "POST", "path": "/v1/images/generations", "status": "200"}
    assert value(samples, "qubax_http_requests_total", **labels) == 1


def test_jobs_and_webhook_tries_are_counted(stack: Stack) -> None:
    raw = stack.live.images.with_raw_response.generate(
        model="dall-e-3", prompt="p", extra_headers={"Prefer": "respond-async"}
    )
    job_id = raw.http_response.json()["id"]
    headers = {"authorization": f"Bearer {stack.live_key}"}

    def ended() -> None:
        assert httpx.get(f"{stack.url}/v1/images/jobs/{job_id}", headers=headers).json()["status"] == "succeeded"
        assert value(scrape(stack), "qubax_jobs_ended_total", status="succeeded") == 1

    eventually(ended)


def test_queued_and_running_jobs_are_a_gauge(settings: Settings) -> None:
    with running_stack(settings, admin_token=SecretStr(ADMIN_TOKEN), job_concurrency=1) as stack:
        stack.bfl.pending_polls = 1_000_000  # the first job's task is not done until told
        for _ in range(2):  # one runs (this node makes one job at a time), the other waits
            stack.live.images.with_raw_response.generate(
                model="flux-1.1-pro", prompt="p", size="256x256", extra_headers={"Prefer": "respond-async"}
            )

        def states() -> tuple[float, float]:
            samples = scrape(stack)
            assert {labels for name, labels in samples if name == "qubax_jobs"} == {
                frozenset({("state", "queued")}),
                frozenset({("state", "in_progress")}),
            }  # both, even at 0
            return value(samples, "qubax_jobs", state="queued"), value(samples, "qubax_jobs", state="in_progress")

        def one_each() -> None:
            assert states() == (1, 1)

        def none() -> None:
            assert states() == (0, 0)

        eventually(one_each, seconds=10)
        stack.bfl.pending_polls = 0
        eventually(none, seconds=30)
    assert len(stack.bfl.submissions) == 2  # both jobs were made


def test_shutdowns_within_30_days_and_models_an_upstream_no_longer_serves(settings: Settings) -> None:
    """Each known shutdown date by who says so (the catalog, OpenAI's model list), a 1 for those within
    30 days or past, and a count of the tries whose upstream answered `model_not_found`, by route."""
    soon, later = (datetime.now(UTC).date() + timedelta(days=days) for days in (10, 100))
    catalog = (
        f'[models."gpt-image-2"]\nshutdown_date = {soon}\n[models."gpt-image-2.6-flare"]\nshutdown_date = {later}\n'
    )
    with running_stack(settings, catalog=catalog, admin_token=SecretStr(ADMIN_TOKEN)) as stack:
        stack.openai.retired = True
        stack.live.images.generate(model="gpt-image-1", prompt="p")  # made by gpt-image-2 after a 404
        samples = eventually(lambda: published(scrape(stack)))
    assert label_values(samples, "qubax_model_shutting_down", "model") >= {"gpt-image-2", "dall-e-3", "gpt-image-1"}
    assert value(samples, "qubax_model_shutting_down", model="gpt-image-2", date=soon.isoformat()) == 1
    assert "gpt-image-2.6-flare" not in label_values(samples, "qubax_model_shutting_down", "model")
    midnight = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
    for source in ("catalog", "openai"):
        assert (
            value(samples, "qubax_model_shutdown_timestamp_seconds", model="gpt-image-1.5", source=source) == midnight
        )
    flare = datetime.combine(later, datetime.min.time(), UTC).timestamp()
    assert (
        value(samples, "qubax_model_shutdown_timestamp_seconds", model="gpt-image-2.6-flare", source="catalog") == flare
    )
    not_found = "qubax_upstream_model_not_found_total"
    assert value(samples, not_found, upstream="openai", upstream_model="gpt-image-1") == 1
    assert label_values(samples, not_found, "upstream_model") == {"gpt-image-1"}  # not the stand-in that made it


def published(samples: Samples) -> Samples:
    """Once OpenAI's model list has been read (as the app started)."""
    assert value(samples, "qubax_model_shutdown_timestamp_seconds", model="dall-e-3", source="openai") > 0
    return samples
