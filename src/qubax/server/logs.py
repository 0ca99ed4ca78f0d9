"""Logging: Qubax's own access log (one line per request, with its request id) and everything else,
as plain text or as one JSON object per line (`QUBAX_LOG_FORMAT=json`). Prompts stay out of the
logs unless `QUBAX_LOG_PROMPTS` is set."""

import asyncio
import logging
import logging.config
import re
import sys
import time
import traceback
from collections.abc import MutableMapping
from typing import Any

import orjson

ACCESS = logging.getLogger("qubax.access")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One object per line: time, level, logger, message, the request's fields, and any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        exception = self.formatException(record.exc_info) if record.exc_info else None
        fields = getattr(record, "fields", None)
        return self.line(record.created, record.levelname, record.name, record.getMessage(), fields, exception)

    def line(
        self,
        created: float,
        level: str,
        logger: str,
        message: str,
        fields: dict[str, Any] | None,
        exception: str | None = None,
    ) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{milliseconds(created):03d}Z",
            "level": level.lower(),
            "logger": logger,
            "message": message,
        }
        if fields:
            entry.update(fields)
        if exception:
            entry["exception"] = exception
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """`TEXT_FORMAT`, with each second's date and time worked out once instead of once a line: glibc's
    `localtime` looks at /etc/localtime on every call, measurably dear on the hot path (bench/README.md)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self.last = (-1, "")  # one attribute, so that threads sharing the formatter never mix two seconds

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.stamp(record.created)

    def stamp(self, created: float) -> str:
        second, text = self.last
        if int(created) != second:
            second = int(created)
            text = time.strftime(self.default_time_format, self.converter(second))
            self.last = (second, text)
        return f"{text},{milliseconds(created):03d}"


def milliseconds(created: float) -> int:
    """The milliseconds part of a time, as `LogRecord.msecs` has it."""
    return int((created - int(created)) * 1000)


class StreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """`logging.StreamHandler`, but access lines (`write_line`) logged on an event loop are written
    together once per turn of the loop instead of with a write (and a flush) each. Every other record,
    and whatever waits when one comes or `flush()` is called, goes out at once, in order: a process can
    end before its loop turns again (uvicorn re-raises SIGTERM once it has shut down), and its last
    words must not be lost."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self.waiting: list[str] = []
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop that will write what waits

    def emit(self, record: logging.LogRecord) -> None:  # called holding self.lock
        try:
            self.waiting.append(self.format(record) + self.terminator)
            self.write_waiting()
        except Exception:
            self.handleError(record)

    def add(self, line: str) -> None:
        """Write a formatted line, now or at the end of this turn of the loop; called holding self.lock."""
        self.waiting.append(line)
        loop = running_loop()
        if loop is None or (self.loop is not None and self.loop is not loop):
            self.write_waiting()
        elif self.loop is None:
            self.loop = loop
            loop.call_soon(self.write_turn)

    def write_line(self, line: str) -> None:
        """A line formatted by the caller as this handler's formatter would (`log_access`)."""
        with self.lock:  # type: ignore[union-attr]
            try:
                self.add(line + self.terminator)
            except Exception:
                self.handleError(logging.makeLogRecord({"msg": line}))

    def write_turn(self) -> None:
        try:
            self.flush()
        except Exception:  # as `handleError` would, without a record to name: a broken stream stops nothing
            if logging.raiseExceptions and sys.stderr:
                traceback.print_exc(file=sys.stderr)

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
    handler = {
        "class": "qubax.server.logs.StreamHandler",
        "formatter": "default",
        "stream": "ext://sys.stderr",
    }
    loggers: dict[str, Any] = {
        name: {"handlers": ["default"], "level": level, "propagate": False} for name in ("qubax", "uvicorn")
    }
    # On the logger that names them, not on the handler: a filter on the handler would send every
    # access line the long way through `logging` (`sole_handler`).
    loggers["uvicorn.error"] = {"filters": ["uvicorn"], "level": level}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"uvicorn": {"()": "qubax.server.logs.uvicorn_name"}},
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "loggers": loggers,
    }


def uvicorn_name() -> Any:
    """A filter that shows uvicorn's server lines ("Started server process", "Shutting down") as
    `uvicorn`: it logs them as `uvicorn.error`, which reads as an error to whoever watches the log."""

    def rename(record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.error":
            record.name = "uvicorn"
        return True

    return rename


def log_access(scope: MutableMapping[str, Any], status: int, started: float, request_id: str) -> None:
    """The access line. The query string never appears: image URLs carry their signature there."""
    if not ACCESS.isEnabledFor(logging.INFO):
        return
    duration = (time.perf_counter() - started) * 1000
    client = scope.get("client")
    peer = f"{client[0]}:{client[1]}" if client else None
    extra = scope.get("qubax.log", {})
    path, method = escaped(scope["path"]), escaped(scope["method"])
    line = f'{peer} "{method} {path}" {status} {duration:.1f}ms {request_id}' + "".join(
        [f" {name}={text(value)}" for name, value in extra.items()]
    )
    handler, created = sole_handler(), time.time()
    if handler is not None and isinstance(handler.formatter, TextFormatter):
        handler.write_line(f"{handler.formatter.stamp(created)} {INFO} {ACCESS.name}: {line}")
        return
    fields = {
        "request_id": request_id,
        "client": peer,
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": round(duration, 1),
        **extra,
    }
    if handler is not None and isinstance(handler.formatter, JsonFormatter):
        handler.write_line(handler.formatter.line(created, INFO, ACCESS.name, line, fields))
        return
    # Not `ACCESS.info`: that walks up the stack for the caller's file and line, which no access line shows.
    ACCESS.handle(ACCESS.makeRecord(ACCESS.name, logging.INFO, __file__, 0, line, (), None, extra={"fields": fields}))


INFO = logging.getLevelName(logging.INFO)


def sole_handler() -> StreamHandler | None:
    """Qubax's own handler, when it is all that would see an access record (as `qubax serve` sets logging
    up): the line is then formatted as that handler would, without a `LogRecord` and the trip through
    `logging`, which is measurably dearer on the hot path (bench/README.md). Any other handler or a filter
    anywhere on the way gets records, as usual."""
    found = None
    logger: logging.Logger | None = ACCESS
    while logger is not None:
        if logger.filters:
            return None
        for handler in logger.handlers:
            if (
                found is not None
                or type(handler) is not StreamHandler
                or handler.filters
                or handler.level > logging.INFO
            ):
                return None
            found = handler
        logger = logger.parent if logger.propagate else None
    return found


QUOTED = frozenset(' "=')


def text(value: Any) -> str:
    """A field's value on a text line: quoted when it has spaces or quotes (a prompt)."""
    plain = escaped(str(value))
    return plain if QUOTED.isdisjoint(plain) else orjson.dumps(plain).decode()


# C0 and C1 controls, DEL and Unicode's line breaks: what a client could use to forge a log line or send
# a terminal escape sequence through a field it chooses (the path is percent-decoded before we see it).
CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escaped(field: str) -> str:
    """A client-chosen field with its control characters written as `\\xNN` / `\\uNNNN`."""
    if CONTROLS.search(field) is None:
        return field
    return CONTROLS.sub(
        lambda found: f"\\x{ord(found[0]):02x}" if ord(found[0]) < 0x100 else f"\\u{ord(found[0]):04x}", field
    )
