"""Traces (the `otel` extra): spans sent over OTLP/HTTP to a real receiver started here, decoded with
`opentelemetry-proto`, as a collector decodes them."""

import gzip
import logging
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from qubax.server import traces
from qubax.server.settings import Settings
from tests.server import serve
from tests.stack import running_stack
from tests.test_admin import TOKEN
from tests.test_jobs import submit
from tests.test_webhooks import Receiver, deliveries, make_secret

PROMPT = "a heron folded from copper wire"


@dataclass
class Collector:
    """An OTLP/HTTP trace receiver: keeps every export's raw body and its spans, decoded."""

    bodies: list[bytes] = field(default_factory=list)
    spans: list[dict[str, Any]] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.app = Starlette(routes=[Route("/v1/traces", self.receive, methods=["POST"])])

    async def receive(self, request: Request) -> Response:
        body = await request.body()
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        self.bodies.append(body)
        export = ExportTraceServiceRequest.FromString(body)
        for resource_spans in export.resource_spans:
            self.resources.append(attributes(resource_spans.resource.attributes))
            for scope_spans in resource_spans.scope_spans:
                self.spans += [decoded(span) for span in scope_spans.spans]
        reply = ExportTraceServiceResponse().SerializeToString()
        return Response(reply, media_type="application/x-protobuf")

    def named(self, name: str) -> list[dict[str, Any]]:
        return [span for span in self.spans if span["name"] == name]


def decoded(span: ProtoSpan) -> dict[str, Any]:
    return {
        "name": span.name,
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent_id": span.parent_span_id.hex(),
        "kind": span.kind,
        "attributes": attributes(span.attributes),
        "error": span.status.code == span.status.STATUS_CODE_ERROR,
    }


def attributes(pairs: Any) -> dict[str, Any]:
    def value(any_value: AnyValue) -> Any:
        return getattr(any_value, any_value.WhichOneof("value") or "string_value")

    return {pair.key: value(pair.value) for pair in pairs}


@pytest.fixture
def collector(monkeypatch: pytest.MonkeyPatch) -> Iterator[Collector]:
    found = Collector()
    with serve(found.app) as url:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # milliseconds; shutdown flushes the rest anyway
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        yield found


def wait_until(check: Any, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def in_trace(spans: list[dict[str, Any]], trace_id: str) -> dict[str, dict[str, Any]]:
    return {span["name"]: span for span in spans if span["trace_id"] == trace_id}


def test_a_generation_a_job_and_its_webhook_are_traced(settings: Settings, collector: Collector) -> None:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    hook = Receiver()
    settings.admin_token = SecretStr(TOKEN)
    changes = {"webhook_allowed_hosts": "127.0.0.1", "webhook_retry_seconds": [0.05], "job_poll_seconds": 0.1}
    with serve(hook.app) as hook_url, running_stack(settings, providers=("bfl",), **changes) as stack:
        webhook_secret = make_secret(stack)
        traceparent = {"traceparent": f"00-{trace_id}-{parent_id}-01"}
        answer = stack.live.images.generate(model="flux-1.1-pro", prompt=PROMPT, extra_headers=traceparent)
        assert answer.data and answer.data[0].url
        job = submit(stack.live, prompt=PROMPT, extra_body={"webhook_url": hook_url + "/hook"})
        wait_until(lambda: deliveries(stack) and deliveries(stack)[0]["status"] == "delivered")
    # The stack has stopped: its last spans were flushed at shutdown.

    request = in_trace(collector.spans, trace_id)
    server = request["POST /v1/images/generations"]
    assert server["kind"] == ProtoSpan.SPAN_KIND_SERVER and server["parent_id"] == parent_id
    assert server["attributes"]["http.route"] == "/v1/images/generations"
    assert server["attributes"]["http.request.method"] == "POST"
    assert server["attributes"]["http.response.status_code"] == 200
    upstream = request["qubax.upstream"]["attributes"]
    assert upstream["qubax.provider"] == "bfl" and upstream["qubax.route"] == "bfl"
    assert upstream["qubax.model"] == "flux-1.1-pro" and upstream["qubax.upstream_model"] == "flux-pro-1.1"
    assert upstream["qubax.outcome"] == "ok" and upstream["qubax.images.made"] == 1
    assert request["qubax.storage.put"]["attributes"]["qubax.bytes"] > 0
    assert request["qubax.ledger.record"]["attributes"]["qubax.outcome"] == "ok"
    assert not any(span["error"] for span in request.values())
    listed = collector.named("GET /admin/webhooks")  # an included router's route: its whole template
    assert listed and listed[0]["attributes"]["http.route"] == "/admin/webhooks"

    [run] = [span for span in collector.named("qubax.job") if span["attributes"]["qubax.job_id"] == job["id"]]
    assert run["trace_id"] != trace_id and run["parent_id"] == ""  # a trace of its own
    made = in_trace(collector.spans, run["trace_id"])
    assert made["qubax.upstream"]["attributes"]["qubax.provider"] == "bfl"
    assert made["qubax.ledger.record"]["attributes"]["qubax.images.made"] == 1  # b64_json: nothing stored
    [delivery] = collector.named("qubax.webhook")
    assert delivery["attributes"]["qubax.job_id"] == job["id"]
    assert delivery["attributes"]["qubax.outcome"] == "delivered"
    assert delivery["attributes"]["http.response.status_code"] == 200

    assert {resource["service.name"] for resource in collector.resources} == {"qubax"}
    sent = b"".join(collector.bodies)
    for secret in (PROMPT, stack.live_key, "test-key", webhook_secret, "signature=", TOKEN):
        assert secret.encode() not in sent, secret


def test_a_failed_route_says_why_the_next_is_tried_and_prompts_only_when_asked(
    settings: Settings, collector: Collector
) -> None:
    with running_stack(settings, providers=("bfl", "together"), trace_prompts=True) as stack:
        stack.bfl.submit_status = 500
        stack.live.images.generate(model="flux-1.1-pro", prompt=PROMPT, response_format="b64_json")
    first, second = sorted(collector.named("qubax.upstream"), key=lambda span: span["attributes"]["qubax.route"])
    assert first["attributes"]["qubax.route"] == "bfl" and second["attributes"]["qubax.route"] == "together"
    assert first["attributes"]["qubax.failover_reason"] == "upstream_error"
    assert first["attributes"]["qubax.images.made"] == 0 and second["attributes"]["qubax.outcome"] == "ok"
    assert first["trace_id"] == second["trace_id"]
    assert second["attributes"]["qubax.prompt"] == PROMPT  # the operator opted in (QUBAX_TRACE_PROMPTS)
    assert "qubax.storage.put" not in in_trace(collector.spans, first["trace_id"])  # b64_json: nothing stored


def test_without_a_collector_nothing_is_set_up(tmp_path: Any) -> None:
    """Off: no OpenTelemetry SDK imported, no span made, while the app serves a request."""
    script = f"""
import sys
from fastapi.testclient import TestClient
from qubax.app import create_app
from qubax.server import traces
from qubax.server.settings import Settings
app = create_app(Settings(data_dir={str(tmp_path)!r}))
with TestClient(app) as client:
    assert client.get("/healthz").status_code == 200
assert traces.span("x") is traces.OFF
assert not [name for name in sys.modules if name.startswith("opentelemetry.sdk")]
print("off")
"""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no OTEL_* variable
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "off", done.stderr


def test_a_collector_without_the_extra_is_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:4318/v1/traces")
    for missing in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter"):
        with monkeypatch.context() as patched, caplog.at_level(logging.WARNING, logger="qubax"):
            patched.setitem(sys.modules, missing, None)  # as if not installed: its import fails
            caplog.clear()
            assert traces.configure() is None
            [line] = caplog.messages
            assert "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set" in line and "qubax[otel]" in line
