"""Whose `X-Forwarded-For` `qubax serve` believes: by default nobody's, so a client (even one on the
same host as the server, as a proxy in front would be) cannot choose the address that the wrong-token
throttle counts and the access log shows; with `QUBAX_FORWARDED_ALLOW_IPS`, the named proxies'."""

import json
from pathlib import Path

import httpx

from tests.test_admin import TOKEN
from tests.test_connection import served

TRIES = 12  # wrong admin tokens, two past the 10 a minute an address may send


def wrong_tokens(port: int) -> list[int]:
    """The statuses of TRIES wrong admin tokens, each claiming to come from a new address."""
    statuses = []
    for n in range(TRIES):
        headers = {"authorization": "Bearer not-the-admin-token", "x-forwarded-for": f"203.0.113.{n + 1}"}
        statuses.append(httpx.get(f"http://127.0.0.1:{port}/admin/keys", headers=headers).status_code)
    return statuses


def logged_clients(data: Path) -> list[str]:
    """The client address of each access line for /admin/keys."""
    lines = (data / "serve.log").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    return [str(record["client"]).rsplit(":", 1)[0] for record in records if record.get("path") == "/admin/keys"]


def test_forwarded_addresses_are_not_believed_by_default(tmp_path: Path) -> None:
    with served(tmp_path, QUBAX_ADMIN_TOKEN=TOKEN, QUBAX_LOG_FORMAT="json") as port:
        statuses = wrong_tokens(port)

    assert statuses == [401] * 10 + [429] * 2
    assert logged_clients(tmp_path) == ["127.0.0.1"] * TRIES


def test_forwarded_addresses_from_a_named_proxy_are_believed(tmp_path: Path) -> None:
    with served(
        tmp_path, QUBAX_ADMIN_TOKEN=TOKEN, QUBAX_LOG_FORMAT="json", QUBAX_FORWARDED_ALLOW_IPS="127.0.0.1"
    ) as port:
        statuses = wrong_tokens(port)

    assert statuses == [401] * TRIES  # each address has its own count
    assert logged_clients(tmp_path) == [f"203.0.113.{n + 1}" for n in range(TRIES)]
