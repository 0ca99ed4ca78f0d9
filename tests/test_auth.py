"""API keys: their format, and that the database never holds one in the clear."""

import asyncio
import hashlib
import re
import sqlite3
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from qubax.records import api_keys
from qubax.server.cli import main
from qubax.server.settings import Settings
from tests.conftest import cli_env, eventually

URLSAFE_43 = re.compile(r"^[A-Za-z0-9_-]{43,}$")


@pytest.mark.parametrize(("test", "prefix"), [(False, "qbx_live_"), (True, "qbx_test_")])
def test_new_key_format(test: bool, prefix: str) -> None:
    new = api_keys.new_key(test=test)
    assert new.secret.startswith(prefix)
    assert URLSAFE_43.match(new.secret.removeprefix(prefix))
    assert new.prefix == new.secret[: len(prefix) + 4]
    assert new.digest == hashlib.sha256(new.secret.encode()).hexdigest()
    assert new.test is test


def test_new_keys_are_unique() -> None:
    keys = [api_keys.new_key(test=False) for _ in range(200)]
    assert len({k.secret for k in keys}) == 200
    assert len({k.digest for k in keys}) == 200


def test_digest_is_lowercase_sha256_hex() -> None:
    assert api_keys.digest_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert re.fullmatch(r"[0-9a-f]{64}", api_keys.digest_key(api_keys.new_key(test=True).secret))


def test_display_prefix_shows_four_secret_characters() -> None:
    assert api_keys.display_prefix("qbx_live_AbCdEfGh") == "qbx_live_AbCd"
    assert api_keys.display_prefix("qbx_test_xyz1234567") == "qbx_test_xyz1"


def test_masked_never_contains_the_full_secret() -> None:
    for test in (False, True):
        key = api_keys.new_key(test=test).secret
        shown = api_keys.masked(key)
        assert shown == key[:12] + "***"
        assert key not in shown
        assert key[12:] not in shown
    assert api_keys.masked("sk-proj-abcdefghijklmnop") == "sk-***"
    assert api_keys.masked("ab") == "ab***"
    assert api_keys.masked("") == "***"


def test_looks_like_key() -> None:
    assert api_keys.looks_like_key("qbx_live_x") and api_keys.looks_like_key("qbx_test_x")
    assert not api_keys.looks_like_key("key_0123abcd")
    assert not api_keys.looks_like_key("QBX_LIVE_x")


def test_a_key_is_known_by_its_digest_alone() -> None:
    key, other = api_keys.new_key(test=False), api_keys.new_key(test=False)
    assert api_keys.digest_key(key.secret) == key.digest and len(key.digest) == 64
    assert key.secret not in key.digest
    assert api_keys.digest_key(other.secret) != key.digest
    assert api_keys.digest_key(key.secret + "x") != key.digest


def database_path(settings: Settings) -> Path:
    url = settings.resolved_database_url
    assert url.startswith("sqlite+aiosqlite:///")
    return Path(url.split(":///", 1)[1])


def cli_create_key(settings: Settings, *args: str) -> str:
    result = CliRunner().invoke(main, ["keys", "create", *args], env=cli_env(settings))
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()[-1]  # the key is the last line even where click mixes in stderr


def all_cells(path: Path) -> list[object]:
    with sqlite3.connect(path) as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        assert {"api_keys", "generations"} <= set(tables)
        return [cell for table in tables for row in connection.execute(f'SELECT * FROM "{table}"') for cell in row]


@pytest.mark.sqlite_only
def test_database_stores_only_the_digest(settings: Settings) -> None:
    keys = [cli_create_key(settings, "--name", "ci"), cli_create_key(settings, "--test")]
    path = database_path(settings)

    cells = all_cells(path)
    assert cells  # the scan saw the rows
    for key in keys:
        hidden = key[13:]  # everything past the displayed prefix
        assert not any(hidden in str(cell) for cell in cells)
        assert key.encode() not in path.read_bytes()
        assert hidden.encode() not in path.read_bytes()

    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT prefix, digest, test, name FROM api_keys ORDER BY created_at").fetchall()
    assert rows == [
        (keys[0][:13], hashlib.sha256(keys[0].encode()).hexdigest(), 0, "ci"),
        (keys[1][:13], hashlib.sha256(keys[1].encode()).hexdigest(), 1, ""),
    ]


def test_cli_key_authenticates_until_revoked(settings: Settings, base_url: str) -> None:
    key = cli_create_key(settings)
    headers = {"authorization": f"Bearer {key}"}
    assert httpx.get(f"{base_url}/v1/models", headers=headers).status_code == 200

    revoke = CliRunner().invoke(main, ["keys", "revoke", key], env=cli_env(settings))
    assert revoke.exit_code == 0, revoke.output

    def refused() -> httpx.Response:
        response = httpx.get(f"{base_url}/v1/models", headers=headers)
        assert response.status_code == 401
        return response

    response = eventually(refused)  # within the key cache's second
    message = response.json()["error"]["message"]
    assert message == f"The API key {key[:12]}*** has been revoked."
    assert key not in response.text


def test_key_cache_remembers_hits_and_misses_for_its_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(api_keys.time, "monotonic", lambda: now[0])
    cache: api_keys.KeyCache[str] = api_keys.KeyCache(ttl=1.0, size=2)
    assert cache.get("d1") == (False, None)
    cache.put("d1", "key-1")
    cache.put("d2", None)  # an unknown key is remembered too
    assert cache.get("d1") == (True, "key-1")
    assert cache.get("d2") == (True, None)
    now[0] += 1.5
    assert cache.get("d1") == (False, None)
    cache.put("d3", "key-3")  # full: the least recently used entry (d1; d2 was read after it) goes
    assert dict(cache.entries) == {"d2": (100.0, None), "d3": (101.5, "key-3")}


def test_a_flood_of_unknown_keys_does_not_push_out_a_busy_one() -> None:
    cache: api_keys.KeyCache[str] = api_keys.KeyCache(ttl=60.0, size=100)
    cache.put("busy", "key")
    for flood in range(1_000):
        cache.put(f"unknown-{flood}", None)
        if flood % 50 == 0:
            assert cache.get("busy") == (True, "key")  # a key in use is read far more often than 1 in 100
    assert cache.get("busy") == (True, "key") and len(cache.entries) == 100


@pytest.mark.anyio
async def test_requests_that_miss_together_share_one_lookup() -> None:
    cache: api_keys.KeyCache[str] = api_keys.KeyCache()
    calls = 0
    release = asyncio.Event()

    async def load() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return "key-1"

    waiters = [asyncio.create_task(cache.fetch("d1", load)) for _ in range(20)]
    await asyncio.sleep(0.01)
    waiters[0].cancel()  # one client leaves: the others still get their answer
    release.set()
    assert await asyncio.gather(*waiters[1:]) == ["key-1"] * 19
    assert calls == 1 and cache.get("d1") == (True, "key-1")


@pytest.mark.anyio
async def test_a_failed_lookup_fails_its_waiters_and_the_next_one_tries_again() -> None:
    cache: api_keys.KeyCache[str] = api_keys.KeyCache()
    answers: list[str | Exception] = [OSError("database down"), "key-1"]

    async def load() -> str:
        await asyncio.sleep(0)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    results = await asyncio.gather(*(cache.fetch("d1", load) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(result, OSError) for result in results)
    assert await cache.fetch("d1", load) == "key-1"
