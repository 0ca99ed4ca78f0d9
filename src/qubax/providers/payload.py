"""Upstream JSON that carries whole images as base64 strings, read and written around them.

json.loads spends most of a large answer's parse time on the one multi-megabyte `b64_json` string,
a large share of a gateway request's CPU (bench/README.md). A base64 string holds no escapes, so its
JSON value is its raw bytes: cut those out, parse the small rest, and put them back, as bytes (ASCII
base64 text). On an answer carrying a 1.5 MB image this takes a third to two fifths of the time orjson
or msgspec take, which spend theirs on the one string (`bench/parsers.py`). Anything unexpected falls
back to a plain parse, whose strings stay str: a `b64_json` value is str or bytes.

`dumps` writes our answers the same way: base64 held as bytes is spliced in as it is, copied once,
never made into a str (a pass over megabytes) nor scanned again for characters to escape.

Plain parses go through orjson (faster than json.loads); what orjson refuses, json.loads
gets a second look at (NaN, lone surrogates), so the result is always exactly what json.loads gives.
"""

import json
import secrets
from typing import Any

import orjson

FIELD = b'"b64_json"'
WORTH_IT = 64 * 1024  # below this a plain parse is as fast


def loads(content: bytes) -> Any:
    """Parse JSON; raises ValueError when it is not JSON."""
    if len(content) >= WORTH_IT and FIELD in content:
        parsed = parse_around_images(content)
        if parsed is not None:
            return parsed
    return parse(content)


def parse(content: bytes) -> Any:
    try:
        return orjson.loads(content)
    except ValueError:
        return json.loads(content)


def parse_around_images(content: bytes) -> Any:
    nonce = f"qubax-{secrets.token_hex(8)}-"
    pieces: list[bytes] = []
    images: list[bytes] = []
    cursor = 0
    while (key := content.find(FIELD, cursor)) != -1:
        start = value_start(content, key + len(FIELD))
        end = content.find(b'"', start) if start is not None else -1
        if start is None or end == -1 or content.find(b"\\", start, end) != -1:
            return None  # not the simple shape we expect: let json.loads judge it
        pieces += [content[cursor:start], f"{nonce}{len(images)}".encode()]
        images.append(content[start:end])
        cursor = end
    pieces.append(content[cursor:])
    try:
        parsed = parse(b"".join(pieces))
    except ValueError:
        return None
    return parsed if restore(parsed, nonce, images) == len(images) else None


def value_start(content: bytes, offset: int) -> int | None:
    """Where the string value after a `"b64_json"` key begins (just past its opening quote)."""
    colon = content.find(b":", offset, offset + 64)
    if colon == -1 or content[offset:colon].strip():
        return None
    quote = colon + 1
    while quote < len(content) and content[quote] in b" \t\r\n":
        quote += 1
    return quote + 1 if content[quote : quote + 1] == b'"' else None


def restore(node: Any, nonce: str, images: list[bytes]) -> int:
    """Put the cut-out strings back where their placeholders landed; returns how many it put back."""
    count = 0
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if isinstance(value, str) and value.startswith(nonce):
            node[key] = images[int(value[len(nonce) :])]
            count += 1
        elif isinstance(value, dict | list):
            count += restore(value, nonce, images)
    return count


def dumps(value: Any) -> bytes:
    """JSON for `value`, whose bytes values are base64 text (one an upstream sent, cut out by `loads`
    and checked as base64 where it became an image): each is written as a JSON string as it is."""
    texts: list[bytes] = []
    nonce = ""  # made at the first bytes value: an answer without any (a small one) costs no random draw

    def placeholder(text: Any) -> str:
        nonlocal nonce
        if not isinstance(text, bytes):
            raise TypeError(f"{type(text).__name__} is not JSON")
        nonce = nonce or f"qubax-{secrets.token_hex(8)}"
        texts.append(text)
        return nonce

    written = orjson.dumps(value, default=placeholder)
    if not texts:
        return written
    parts = written.split(nonce.encode())  # in the order the values were met: one more part than texts
    return b"".join(piece for pair in zip(parts, [*texts, b""], strict=True) for piece in pair)
