import base64
import json

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
    content = json.dumps(document, separators=separators).encode()
    assert payload.loads(content) == json.loads(content)


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
