"""An upstream's answer as we read it: status, headers and the whole body, within a size cap."""

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from qubax.errors import UpstreamError
from qubax.providers import payload

MAX_BODY_BYTES = 64 * 1024 * 1024  # of any one answer, JSON or image


class AnswerTooLarge(Exception):
    pass


@dataclass(frozen=True)
class Reply:
    """An upstream's whole answer: status, headers and body (read in full, within MAX_BODY_BYTES)."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes

    def json(self) -> Any:
        """The body as JSON; raises ValueError when it is not."""
        return payload.loads(self.content)


async def read_body(response: aiohttp.ClientResponse) -> bytes:
    """The whole body, up to MAX_BODY_BYTES after decompression."""
    declared = response.content_length
    if declared is not None and declared > MAX_BODY_BYTES:
        raise AnswerTooLarge
    if declared is not None and "content-encoding" not in response.headers:
        return await response.read()  # one buffer, its size known and within the cap
    chunks, size = [], 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise AnswerTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def read_json(response: Reply, provider: str) -> dict[str, Any]:
    """The JSON object the upstream returned, or an error that says it sent something else."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        # Nothing usable came back, so nothing was handed over; inside `billed()` this becomes final.
        raise UpstreamError(f"{provider} returned an unreadable response (not a JSON object).", failover=True)
    return body
