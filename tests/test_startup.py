"""Configuration mistakes at `qubax serve`: a line or two naming the variable, a non-zero exit, no traceback."""

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from qubax.api import admin_token
from qubax.app import create_app
from qubax.server.settings import Settings
from tests.test_admin import TOKEN
from tests.test_readme import free_port

QUBAX = str(Path(sys.executable).parent / "qubax")
SPACES = "".join(map(chr, range(0x2000, 0x200B)))  # eleven different Unicode spaces


def serve(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUBAX_")}
    env |= {"QUBAX_DATA_DIR": str(tmp_path / "data"), **variables}
    command = [QUBAX, "serve", "--port", str(free_port())]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize(
    ("variables", "says"),
    [
        (
            {"QUBAX_REQUEST_TIMEOUT_SECONDS": "abc"},
            "QUBAX_REQUEST_TIMEOUT_SECONDS='abc': Input should be a valid number",
        ),
        ({"QUBAX_LOG_FORMAT": "xml"}, "QUBAX_LOG_FORMAT='xml': Input should be 'text' or 'json'"),
        ({"QUBAX_SIGNING_SECRET": "short-secret"}, "QUBAX_SIGNING_SECRET: must be at least 32 characters"),
        ({"QUBAX_ADMIN_TOKEN": "tiny"}, "QUBAX_ADMIN_TOKEN: must be at least 32 characters"),
        ({"QUBAX_ADMIN_TOKEN": " " * 32}, "QUBAX_ADMIN_TOKEN: is blank or repetitive"),
        ({"QUBAX_ADMIN_TOKEN": "a" * 32}, "QUBAX_ADMIN_TOKEN: is blank or repetitive"),
        ({"QUBAX_DATABASE_URL": "mysql://user:pw@localhost/qubax"}, "QUBAX_DATABASE_URL: cannot open 'mysql' URLs"),
        # The plain scheme is taken, with the async driver: the failure is reaching it, not the URL.
        ({"QUBAX_DATABASE_URL": "postgresql://u@127.0.0.1:9/q"}, "QUBAX_DATABASE_URL: cannot use the database at"),
        ({"QUBAX_PUBLIC_URL": "images.example.com"}, "QUBAX_PUBLIC_URL='images.example.com': must be an absolute URL"),
        ({"QUBAX_WEBHOOK_RETRY_SECONDS": "5,soon"}, "QUBAX_WEBHOOK_RETRY_SECONDS='soon': Input should be a valid"),
        (
            {"QUBAX_DATABASE_URL": "postgresql+asyncpg://qubax:hunter2-secret@127.0.0.1:9/qubax"},
            "QUBAX_DATABASE_URL: cannot use the database at 127.0.0.1:9",
        ),
        ({"QUBAX_REDIS_URL": "redis://127.0.0.1:9/0"}, "QUBAX_REDIS_URL: cannot reach Redis (Error 111 connecting"),
        ({"QUBAX_STORAGE_URL": "ftp://x"}, "QUBAX_STORAGE_URL='ftp://x': QUBAX_STORAGE_URL must be s3://"),
    ],
)
def test_a_mistake_stops_the_start_with_a_line_that_names_it(
    tmp_path: Path, variables: dict[str, str], says: str
) -> None:
    done = serve(tmp_path, **variables)

    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0
    assert 1 <= len(lines) <= 2, done.stderr
    assert says in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert "hunter2" not in done.stderr  # a password in a URL is never repeated


def test_a_data_folder_that_cannot_be_written_stops_the_start(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")  # refused even to root, unlike a permission bit

    done = serve(tmp_path, QUBAX_DATA_DIR=str(blocker / "data"))

    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert f"QUBAX_DATA_DIR='{blocker / 'data'}': cannot write there (Not a directory)" in lines[0]


@pytest.mark.parametrize("token", [" " * 32, "a" * 32, "ab" * 20, "0123456" * 6, SPACES * 3])
def test_a_blank_or_repetitive_admin_token_is_refused(tmp_path: Path, token: str) -> None:
    with pytest.raises(ValidationError, match="blank or repetitive"):
        Settings(data_dir=tmp_path, admin_token=token)  # type: ignore[arg-type]
    given = Settings(data_dir=tmp_path)
    given.admin_token = SecretStr(token)  # not read from the environment: create_app checks it itself
    with pytest.raises(ValueError, match="QUBAX_ADMIN_TOKEN: is blank or repetitive"):
        create_app(given)


@pytest.mark.parametrize("token", [secrets.token_hex(32), secrets.token_urlsafe(24), TOKEN])
def test_a_random_admin_token_is_taken(tmp_path: Path, token: str) -> None:
    assert admin_token.enabled(Settings(data_dir=tmp_path, admin_token=token))  # type: ignore[arg-type]


def test_plain_forms_of_settings_are_taken(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QUBAX_WEBHOOK_RETRY_SECONDS", "5, 10")
    monkeypatch.setenv("QUBAX_DATABASE_URL", f"sqlite:///{tmp_path}/x.db")
    monkeypatch.setenv("QUBAX_PUBLIC_URL", "https://images.example.com")

    settings = Settings()

    assert settings.webhook_retry_seconds == [5, 10]
    assert settings.resolved_database_url == f"sqlite+aiosqlite:///{tmp_path}/x.db"
    assert Settings(database_url="postgresql://u@db/q").resolved_database_url == "postgresql+asyncpg://u@db/q"
    assert Settings(webhook_retry_seconds="[1, 2]").webhook_retry_seconds == [1, 2]  # type: ignore[arg-type]
