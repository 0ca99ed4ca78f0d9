"""Logs: one access line per request with its request id, text or JSON, never a query string, and
prompts only when the operator asks for them."""

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from qubax.app import create_app
from qubax.logs import ACCESS, TEXT_FORMAT, JsonFormatter, StreamHandler, TextFormatter, access_record
from qubax.settings import Settings
from tests.conftest import create_key
from tests.postgres import free_port
from tests.server import serve
from tests.test_readme import wait_for_health

PROMPT = "a secret lighthouse at dusk"


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "qubax.access"]


def generate(url: str, key: str, response_format: str = "b64_json") -> httpx.Response:
    body = {"model": "dall-e-3", "prompt": PROMPT, "response_format": response_format}
    return httpx.post(f"{url}/v1/images/generations", json=body, headers={"authorization": f"Bearer {key}"})


def test_each_request_gets_one_access_line_with_its_request_id(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    key = create_key(settings, test=True)
    caplog.set_level(logging.INFO, logger="qubax.access")
    with serve(create_app(settings)) as url:
        answer = generate(url, key)
        missing = httpx.get(f"{url}/v1/models/nope", headers={"authorization": f"Bearer {key}"})
    first, second = access_records(caplog)
    assert first.fields == {  # type: ignore[attr-defined]
        "request_id": answer.headers["x-request-id"],
        "client": first.fields["client"],  # type: ignore[attr-defined]
        "method": "POST",
        "path": "/v1/images/generations",
        "status": 200,
        "duration_ms": first.fields["duration_ms"],  # type: ignore[attr-defined]
        "model": "dall-e-3",
        "route": "test",
        "images": 1,
    }
    assert answer.headers["x-request-id"] in first.getMessage()
    assert second.fields["status"] == 404  # type: ignore[attr-defined]
    assert second.fields["request_id"] == missing.headers["x-request-id"]  # type: ignore[attr-defined]


@pytest.mark.local_storage_only  # with S3 and no public URL, image links point at the bucket, not at us
def test_prompts_and_signatures_stay_out_unless_asked(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    key = create_key(settings, test=True)
    caplog.set_level(logging.INFO, logger="qubax.access")
    with serve(create_app(settings)) as url:
        link = generate(url, key, "url").json()["data"][0]["url"]
        assert httpx.get(link).status_code == 200
        settings.log_prompts = True
        with serve(create_app(settings)) as second:
            generate(second, key)
    without, image, with_prompt = access_records(caplog)
    assert PROMPT not in without.getMessage() and "prompt" not in without.fields  # type: ignore[attr-defined]
    assert "signature" not in image.getMessage() and "?" not in image.fields["path"]  # type: ignore[attr-defined]
    assert image.fields["path"].startswith("/images/img_")  # type: ignore[attr-defined]
    assert with_prompt.fields["prompt"] == PROMPT  # type: ignore[attr-defined]
    assert f'prompt="{PROMPT}"' in with_prompt.getMessage()


def test_the_access_log_can_be_turned_off(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    key = create_key(settings, test=True)
    settings.access_log = False
    caplog.set_level(logging.INFO, logger="qubax.access")
    with serve(create_app(settings)) as url:
        assert generate(url, key).status_code == 200
    assert access_records(caplog) == []


def test_json_lines_carry_the_fields_and_any_traceback() -> None:
    record = logging.LogRecord("qubax", logging.ERROR, "", 0, "failed %s", ("x",), None)
    record.fields = {"request_id": "req_1", "status": 500}
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "failed x" and line["level"] == "error" and line["logger"] == "qubax"
    assert (line["request_id"], line["status"]) == ("req_1", 500)
    assert "ValueError: boom" in line["exception"]
    assert line["time"].endswith("Z")


def test_serve_writes_json_lines(tmp_path: Path) -> None:
    """`qubax serve` with QUBAX_LOG_FORMAT=json: every line on stderr is one JSON object, uvicorn's included."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUBAX_")}
    env |= {"QUBAX_DATA_DIR": str(tmp_path / "data"), "QUBAX_LOG_FORMAT": "json"}
    qubax = str(Path(sys.executable).parent / "qubax")
    key = subprocess.run([qubax, "keys", "create", "--test"], env=env, capture_output=True, text=True, check=True)
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            [qubax, "serve", "--port", str(port)], env=env, stdout=output, stderr=output, start_new_session=True
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for_health(url, server, 30)
            client = openai.OpenAI(api_key=key.stdout.strip(), base_url=f"{url}/v1", max_retries=0)
            request_id = client.images.with_raw_response.generate(model="dall-e-3", prompt=PROMPT).headers[
                "x-request-id"
            ]
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(10)
    text = log.read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    generation = next(line for line in lines if line.get("request_id") == request_id)
    assert generation["path"] == "/v1/images/generations" and generation["status"] == 200
    assert any(line["logger"].startswith("uvicorn") for line in lines)
    assert any(line["message"].startswith("data folder: ") for line in lines)
    assert PROMPT not in text


def test_text_lines_read_as_the_standard_formatter_writes_them() -> None:
    ours, standard = TextFormatter(), logging.Formatter(TEXT_FORMAT)
    for created in (1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.5, 1_700_003_600.25):
        record = logging.LogRecord("qubax", logging.INFO, "", 0, "hello %s", ("there",), None)
        record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
        assert ours.format(record) == standard.format(record)


def test_access_records_are_the_records_logging_would_make() -> None:
    fields = {"request_id": "req_1", "status": 200}
    ours = vars(access_record("a line", fields))
    usual = vars(ACCESS.makeRecord(ACCESS.name, logging.INFO, "", 0, "a line", (), None, extra={"fields": fields}))
    made_at = {"created", "msecs", "relativeCreated", "pathname", "filename", "module"}
    assert {name: value for name, value in ours.items() if name not in made_at} == {
        name: value for name, value in usual.items() if name not in made_at
    }
    assert (
        abs(ours["created"] - usual["created"]) < 1 and abs(ours["relativeCreated"] - usual["relativeCreated"]) < 1000
    )
    assert ours["msecs"] == int((ours["created"] - int(ours["created"])) * 1000)
    in_thread: list[logging.LogRecord] = []
    worker = threading.Thread(target=lambda: in_thread.append(access_record("x", {})), name="elsewhere")
    worker.start()
    worker.join()
    assert in_thread[0].threadName == "elsewhere" and in_thread[0].thread == worker.ident


def line_record(message: str) -> logging.LogRecord:
    return logging.LogRecord("qubax", logging.INFO, "", 0, message, (), None)


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_lines_logged_in_one_turn_of_the_loop_are_written_together() -> None:
    stream = CountingStream()
    handler = StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))

    async def log_a_turn() -> None:
        for number in range(3):
            handler.handle(line_record(f"line {number}"))
        assert stream.getvalue() == ""  # not yet: at the end of this turn
        await asyncio.sleep(0)
        assert stream.getvalue() == "line 0\nline 1\nline 2\n" and stream.writes == 1
        handler.handle(line_record("next turn"))
        threading.Thread(target=handler.handle, args=(line_record("from a thread"),)).start()
        await asyncio.sleep(0.2)
        # The thread's line went out at once, after the line that waited for this loop: order holds.
        assert stream.getvalue().endswith("next turn\nfrom a thread\n")
        handler.handle(line_record("last"))

    asyncio.run(log_a_turn())
    assert stream.getvalue().endswith("last\n")  # the loop ran its callbacks before it closed
    handler.handle(line_record("no loop"))  # outside any loop: at once
    assert stream.getvalue().endswith("last\nno loop\n")


def test_flush_writes_what_waits() -> None:
    stream = CountingStream()
    handler = StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))

    async def log_and_flush() -> None:
        handler.handle(line_record("waiting"))
        handler.flush()  # as logging.shutdown() does at exit
        assert stream.getvalue() == "waiting\n"

    asyncio.run(log_and_flush())
