"""Logs: one access line per request with its request id, text or JSON, never a query string, and
prompts only when the operator asks for them."""

import asyncio
import contextlib
import io
import json
import logging
import logging.config
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from qubax.app import create_app
from qubax.server import logs
from qubax.server.logs import ACCESS, TEXT_FORMAT, JsonFormatter, StreamHandler, TextFormatter, log_access, sole_handler
from qubax.server.settings import Settings
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
    assert any(line["logger"] == "uvicorn" for line in lines)
    assert not any(line["logger"] == "uvicorn.error" for line in lines)  # server lines are no errors
    # SIGTERM: the log says the shutdown finished (uvicorn ends the process as soon as it has).
    assert [line["message"] for line in lines[-2:]] == [
        "Application shutdown complete.",
        f"Finished server process [{server.pid}]",
    ]
    assert any(line["message"].startswith("data folder: ") for line in lines)
    warning = next(line for line in lines if line["message"].startswith("no upstream configured"))
    assert warning["level"] == "warning" and "TOGETHER_API_KEY (flux-1.1-pro, flux-1-schnell)" in warning["message"]
    assert PROMPT not in text


def test_text_lines_read_as_the_standard_formatter_writes_them() -> None:
    ours, standard = TextFormatter(), logging.Formatter(TEXT_FORMAT)
    for created in (1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.5, 1_700_003_600.25):
        record = logging.LogRecord("qubax", logging.INFO, "", 0, "hello %s", ("there",), None)
        record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
        assert ours.format(record) == standard.format(record)


@pytest.fixture
def own_handler() -> Iterator[tuple[StreamHandler, io.StringIO]]:
    """Qubax's handler alone on the `qubax` logger, as `qubax serve` sets logging up."""
    logger = logging.getLogger("qubax")
    saved = (logger.handlers, logger.propagate, logger.level)
    stream = io.StringIO()
    handler = StreamHandler(stream)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield handler, stream
    finally:
        logger.handlers, logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])


@contextlib.contextmanager
def alone(handler: logging.Handler) -> Iterator[None]:
    """Only `handler` on the `qubax` logger: pytest adds its capturing handlers to it for each test phase."""
    logger = logging.getLogger("qubax")
    saved, logger.handlers = logger.handlers, [handler]
    try:
        yield
    finally:
        logger.handlers = saved


SCOPE = {"method": "POST", "path": "/v1/images/generations", "client": ("10.0.0.1", 5000)}
EXTRA = {"model": "dall-e-3", "route": "openai", "images": 1, "prompt": 'a "quoted" prompt'}


def access_line_through_records(formatter: logging.Formatter) -> str:
    """What the access line reads as when a second handler makes `log_access` go through `logging`."""
    stream = io.StringIO()
    second = logging.StreamHandler(stream)
    second.setFormatter(formatter)
    logging.getLogger("qubax").addHandler(second)
    try:
        log_access({**SCOPE, "qubax.log": EXTRA}, 201, time.perf_counter(), "req_1")
    finally:
        logging.getLogger("qubax").removeHandler(second)
    return stream.getvalue()


def test_the_own_handler_gets_the_line_logging_would_write(
    own_handler: tuple[StreamHandler, io.StringIO], caplog: pytest.LogCaptureFixture
) -> None:
    """With nothing but Qubax's handler listening, the access line skips `LogRecord`s: same text, same JSON."""
    handler, stream = own_handler
    for formatter in (TextFormatter(), JsonFormatter()):
        handler.setFormatter(formatter)
        stream.seek(0), stream.truncate()
        with alone(handler):
            assert sole_handler() is handler
            log_access({**SCOPE, "qubax.log": EXTRA}, 201, time.perf_counter(), "req_1")
        direct = stream.getvalue()
        stream.seek(0), stream.truncate()
        with alone(handler):
            through_records = access_line_through_records(formatter)
        assert stream.getvalue() == through_records  # both handlers wrote the same line
        if isinstance(formatter, TextFormatter):
            stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
            pattern = stamp + r' INFO qubax\.access: 10\.0\.0\.1:5000 "POST /v1/images/generations" 201 \d+\.\dms req_1'
            tail = ' model=dall-e-3 route=openai images=1 prompt="a \\"quoted\\" prompt"\n'
            for written in (direct, through_records):
                assert re.fullmatch(pattern + re.escape(tail), written), written
        else:
            direct_entry, record_entry = json.loads(direct), json.loads(through_records)
            for entry in (direct_entry, record_entry):
                entry.pop("time"), entry.pop("duration_ms")
                entry["message"] = re.sub(r"\d+\.\dms", "ms", entry["message"])
            assert direct_entry == record_entry
            assert direct_entry["logger"] == "qubax.access" and direct_entry["status"] == 201
            assert direct_entry["prompt"] == EXTRA["prompt"] and direct_entry["client"] == "10.0.0.1:5000"
    assert [record for record in caplog.records if record.name == "qubax.access"] == []  # nothing else listened


def test_logging_as_serve_sets_it_up_takes_the_short_way() -> None:
    """`logs.config` (what `qubax serve` applies) leaves the access line its short way, and uvicorn's
    server lines are still shown as `uvicorn`."""
    names = ("qubax", "uvicorn", "uvicorn.error")
    saved = {name: logging.getLogger(name).__dict__.copy() for name in names}
    try:
        for log_format in ("text", "json"):
            logging.config.dictConfig(logs.config(log_format))
            (handler,) = [h for h in logging.getLogger("qubax").handlers if isinstance(h, StreamHandler)]
            with alone(handler):
                assert sole_handler() is handler
            stream = io.StringIO()
            handler.setStream(stream)
            logging.getLogger("uvicorn.error").info("Started server process [1]")
            assert "uvicorn:" in stream.getvalue() or '"logger":"uvicorn"' in stream.getvalue()
            assert "uvicorn.error" not in stream.getvalue()
    finally:
        for name in names:
            logger = logging.getLogger(name)
            logger.__dict__.clear()
            logger.__dict__.update(saved[name])


def test_any_other_listener_gets_records(own_handler: tuple[StreamHandler, io.StringIO]) -> None:
    handler, stream = own_handler
    handler.setFormatter(TextFormatter())
    seen: list[logging.LogRecord] = []

    def look(record: logging.LogRecord) -> bool:
        seen.append(record)
        return True

    for filtered in (ACCESS, handler):  # a filter on the logger, then one on the handler
        filtered.addFilter(look)
        try:
            with alone(handler):
                log_access({**SCOPE, "qubax.log": EXTRA}, 200, time.perf_counter(), "req_2")
        finally:
            filtered.removeFilter(look)
    assert len(seen) == 2
    assert all(record.fields["request_id"] == "req_2" for record in seen)  # type: ignore[attr-defined]
    assert stream.getvalue().count("req_2") == 2


def line_record(message: str) -> logging.LogRecord:
    return logging.LogRecord("qubax", logging.INFO, "", 0, message, (), None)


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_access_lines_logged_in_one_turn_of_the_loop_are_written_together() -> None:
    stream = CountingStream()
    handler = StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))

    async def log_a_turn() -> None:
        for number in range(3):
            handler.write_line(f"line {number}")
        assert stream.getvalue() == ""  # not yet: at the end of this turn
        await asyncio.sleep(0)
        assert stream.getvalue() == "line 0\nline 1\nline 2\n" and stream.writes == 1
        handler.write_line("next turn")
        threading.Thread(target=handler.write_line, args=("from a thread",)).start()
        await asyncio.sleep(0.2)
        # The thread's line went out at once, after the line that waited for this loop: order holds.
        assert stream.getvalue().endswith("next turn\nfrom a thread\n")
        handler.write_line("last")

    asyncio.run(log_a_turn())
    assert stream.getvalue().endswith("last\n")  # the loop ran its callbacks before it closed
    handler.write_line("no loop")  # outside any loop: at once
    assert stream.getvalue().endswith("last\nno loop\n")


def test_any_other_record_goes_out_at_once_with_what_waits_before_it() -> None:
    stream = CountingStream()
    handler = StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))

    async def log() -> None:
        handler.write_line("an access line")
        handler.handle(line_record("Finished server process"))  # the process may end before the next turn
        assert stream.getvalue() == "an access line\nFinished server process\n"

    asyncio.run(log())


def test_flush_writes_what_waits() -> None:
    stream = CountingStream()
    handler = StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))

    async def log_and_flush() -> None:
        handler.write_line("waiting")
        handler.flush()  # as logging.shutdown() does at exit
        assert stream.getvalue() == "waiting\n"

    asyncio.run(log_and_flush())


FORGED = '/x\n2026-12-01 10:00:00,000 INFO qubax.access: 1.2.3.4:5 "GET /admin" 200 \x1b[31mred\x9b\u2028'


def test_control_characters_in_a_path_cannot_forge_lines_or_colour_a_terminal(
    own_handler: tuple[StreamHandler, io.StringIO], settings: Settings
) -> None:
    handler, stream = own_handler
    for formatter in (TextFormatter(), JsonFormatter()):
        handler.setFormatter(formatter)
        stream.seek(0), stream.truncate()
        with alone(handler):
            log_access({**SCOPE, "path": FORGED, "qubax.log": {"prompt": "two\nlines\x1b[0m"}}, 404, 0.0, "req_1")
        written = stream.getvalue()
        assert written.count("\n") == 1 and written.endswith("\n"), written
        assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]", written), written
    assert "\\x0a2026-12-01" in json.loads(written)["path"] and "\\x1b[31m" in json.loads(written)["message"]
    # End to end: a percent-encoded line break in a URL, without a key, gives one escaped line.
    handler.setFormatter(TextFormatter())
    stream.seek(0), stream.truncate()
    with serve(create_app(settings)) as url, alone(handler):
        httpx.get(f"{url}/x%0a2026-12-01%20INFO%20forged%1b%5b31m")
    lines = [line for line in stream.getvalue().splitlines() if "qubax.access" in line]
    assert len(lines) == 1 and "/x\\x0a2026-12-01 INFO forged\\x1b[31m" in lines[0], stream.getvalue()
