"""Logging: Qubax's own access log (one line per request, with its request id) and everything else,
as plain text or as one JSON object per line (`QUBAX_LOG_FORMAT=json`). Prompts stay out of the
logs unless `QUBAX_LOG_PROMPTS` is set."""

import logging
import logging.config
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


def config(log_format: str, level: str = "INFO") -> dict[str, Any]:
    """A `logging.config.dictConfig` for Qubax and uvicorn both (uvicorn's own access log stays off)."""
    formatter = {"()": JsonFormatter} if log_format == "json" else {"format": TEXT_FORMAT}
    handler = {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
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
    # What `ACCESS.info` does, less finding the caller's file and line by walking the stack, which no access
    # line shows: that walk was a third of the line's cost, paid on every request (bench/README.md).
    ACCESS.handle(ACCESS.makeRecord(ACCESS.name, logging.INFO, __file__, 0, line, (), None, extra={"fields": fields}))


TEXT_LINE_FIELDS = {"request_id", "client", "method", "path", "status", "duration_ms"}
QUOTED = frozenset(' "=')


def text(value: Any) -> str:
    """A field's value on a text line: quoted when it has spaces or quotes (a prompt)."""
    plain = str(value)
    return plain if QUOTED.isdisjoint(plain) else orjson.dumps(plain).decode()
