import base64
import json
from typing import Any

import pytest

from qubax.providers import payload

IMAGE = base64.b64encode(bytes(range(256)) * 400).decode()  # ~136 KB of base64: takes the fast path


@pytest.mark.parametrize(
    "document",
    [
        {"created": 1, "data": [{"b64_json": IMAGE, "revised_prompt": "a cat"}]},
        {"data": [{"b64_json": IMAGE}, {"b64_json": IMAGE[::-1]}], "note": 'say "b64_json": "x"'},
        {"data": [{"url": "https://x/y.png"}], "padding": "p" * 70_000, "b64_json": IMAGE},
        {"data": [{"b64_json": ""}], "padding": "p" * 70_000},
    ],
)
@pytest.mark.parametrize("separators", [(",", ":"), (", ", ": "), (",", " :\n  ")])
def test_same_result_as_json_loads(document: object, separators: tuple[str, str]) -> None:
    """The same values, the base64 cut out around held as bytes (its text, never made into a str)."""
    content = json.dumps(document, separators=separators).encode()
    parsed = payload.loads(content)
    assert as_text(parsed) == json.loads(content)
    assert isinstance(parsed["data"][0].get("b64_json", b""), bytes)


def as_text(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: as_text(value) for key, value in node.items()}
    if isinstance(node, list):
        return [as_text(value) for value in node]
    return node.decode("ascii") if isinstance(node, bytes) else node


@pytest.mark.parametrize("count", [0, 1, 3])
def test_dumps_writes_base64_held_as_bytes_as_json_strings(count: int) -> None:
    texts = [IMAGE[index:] for index in range(count)]
    document = {"created": 1, "data": [{"b64_json": text.encode(), "revised_prompt": 'a "cat"'} for text in texts]}
    written = payload.dumps(document)
    assert json.loads(written) == as_text(document)
    assert payload.dumps(as_text(document)) == written  # as a str would have been written


def test_dumps_round_trips_what_loads_cut_out() -> None:
    content = json.dumps({"data": [{"b64_json": IMAGE}, {"b64_json": IMAGE[::-1]}]}).encode()
    assert json.loads(payload.dumps(payload.loads(content))) == json.loads(content)


def test_dumps_refuses_what_is_not_json() -> None:
    with pytest.raises(TypeError):
        payload.dumps({"when": object()})


def test_escaped_slashes_and_odd_shapes_fall_back_to_a_plain_parse() -> None:
    escaped = json.dumps({"data": [{"b64_json": IMAGE}]}).replace("/", "\\/").encode()
    assert payload.loads(escaped)["data"][0]["b64_json"] == IMAGE
    as_number = b'{"b64_json": 5, "pad": "' + b"p" * 70_000 + b'"}'
    assert payload.loads(as_number)["b64_json"] == 5
    unterminated = b'{"data": [{"b64_json": "' + IMAGE.encode()
    with pytest.raises(ValueError):
        payload.loads(unterminated)


def test_not_json_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        payload.loads(b"<html>" + b"x" * 70_000 + b'"b64_json"')
