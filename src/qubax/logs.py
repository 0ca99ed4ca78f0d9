"""Logging: Qubax's own access log (one line per request, with its request id) and everything else,
as plain text or as one JSON object per line (`QUBAX_LOG_FORMAT=json`). Prompts stay out of the
logs unless `QUBAX_LOG_PROMPTS` is set."""

import asyncio
import logging
import logging.config
import os
import threading
import time
from collections.abc import MutableMapping
from typing import Any

import orjson

ACCESS = logging.getLogger("qubax.access")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One object per line: time, level, logger, message, the request's fields, and any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT`, with each second's date and time worked out once instead of once a line."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self.last = (-1, "")  # one attribute, so that threads sharing the formatter never mix two seconds

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second, stamp = self.last
        if int(record.created) != second:
            second = int(record.created)
            stamp = time.strftime(self.default_time_format, self.converter(second))
            self.last = (second, stamp)
        return f"{stamp},{int(record.msecs):03d}"


class StreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """`logging.StreamHandler`, but lines logged on an event loop are written together once per turn of
    the loop: a write (and flush) per line cost ~15% of a light request's CPU (bench/README.md).
    Lines from elsewhere, and whatever waits when `flush()` is called, go out at once, in order."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self.waiting: list[str] = []
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop that will write what waits

    def emit(self, record: logging.LogRecord) -> None:  # called holding self.lock
        try:
            self.waiting.append(self.format(record) + self.terminator)
            loop = running_loop()
            if loop is None or (self.loop is not None and self.loop is not loop):
                self.write_waiting()
            elif self.loop is None:
                self.loop = loop
                loop.call_soon(self.flush)
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self.loop = None
            self.write_waiting()

    def write_waiting(self) -> None:
        if self.waiting:
            lines, self.waiting = "".join(self.waiting), []
            self.stream.write(lines)
        if hasattr(self.stream, "flush"):
            self.stream.flush()


def running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def config(log_format: str, level: str = "INFO") -> dict[str, Any]:
    """A `logging.config.dictConfig` for Qubax and uvicorn both (uvicorn's own access log stays off)."""
    formatter = {"()": JsonFormatter if log_format == "json" else TextFormatter}
    handler = {"class": "qubax.logs.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
    loggers = {name: {"handlers": ["default"], "level": level, "propagate": False} for name in ("qubax", "uvicorn")}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "loggers": loggers,
    }


def log_access(scope: MutableMapping[str, Any], status: int, started: float, request_id: str) -> None:
    """The access line. The query string never appears: image URLs carry their signature there."""
    if not ACCESS.isEnabledFor(logging.INFO):
        return
    milliseconds = (time.perf_counter() - started) * 1000
    client = scope.get("client")
    fields: dict[str, Any] = {
        "request_id": request_id,
        "client": f"{client[0]}:{client[1]}" if client else None,
        "method": scope["method"],
        "path": scope["path"],
        "status": status,
        "duration_ms": round(milliseconds, 1),
        **scope.get("qubax.log", {}),
    }
    extra = "".join(f" {name}={text(value)}" for name, value in fields.items() if name not in TEXT_LINE_FIELDS)
    line = f'{fields["client"]} "{scope["method"]} {scope["path"]}" {status} {milliseconds:.1f}ms {request_id}{extra}'
    ACCESS.handle(access_record(line, fields))


def access_record(message: str, fields: dict[str, Any]) -> logging.LogRecord:
    """The record `ACCESS.info(message, extra={"fields": fields})` would make, made for less: no walk up the
    stack for the caller's file and line, which no access line shows, and the process's names and this
    file's looked up once per process instead of once a line. Each was a few % of a light request's CPU
    (bench/README.md)."""
    process = os.getpid()
    template = ACCESS_TEMPLATES.get(process)
    if template is None:
        template = ACCESS_TEMPLATES[process] = vars(
            ACCESS.makeRecord(ACCESS.name, logging.INFO, __file__, 0, "", (), None)
        )
    record = logging.LogRecord.__new__(logging.LogRecord)
    attributes = record.__dict__
    attributes.update(template)
    created, thread = time.time(), threading.current_thread()
    attributes["msg"], attributes["fields"] = message, fields
    attributes["created"], attributes["msecs"] = created, int((created - int(created)) * 1000) + 0.0
    attributes["relativeCreated"] = template["relativeCreated"] + (created - template["created"]) * 1000
    attributes["thread"], attributes["threadName"] = thread.ident, thread.name
    return record


ACCESS_TEMPLATES: dict[int, dict[str, Any]] = {}  # by process id: a forked child makes its own


TEXT_LINE_FIELDS = {"request_id", "client", "method", "path", "status", "duration_ms"}
QUOTED = frozenset(' "=')


def text(value: Any) -> str:
    """A field's value on a text line: quoted when it has spaces or quotes (a prompt)."""
    plain = str(value)
    return plain if QUOTED.isdisjoint(plain) else orjson.dumps(plain).decode()
