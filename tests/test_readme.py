"""The README's two commands, as a newcomer runs them on a clean checkout."""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVE = "./qubax serve"
TEST = "./scripts/test"


def test_readme_and_ci_name_the_same_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert f"{SERVE}  " in readme and f"{TEST}  " in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "exec ./scripts/test" in ci
    assert os.access(ROOT / "qubax", os.X_OK) and os.access(ROOT / "scripts" / "test", os.X_OK)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_health(url: str, server: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"server exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("server did not become healthy")


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs a git checkout to clone")
def test_serve_command_on_a_clean_clone(tmp_path: Path) -> None:
    """Clone HEAD, run `./qubax serve` there (it installs itself), then follow the README's test-key path."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUBAX_", "VIRTUAL_ENV"))}
    env["QUBAX_DATA_DIR"] = str(tmp_path / "data")
    port = free_port()
    server = subprocess.Popen(
        [*SERVE.split(), "--port", str(port)], cwd=clone, env=env, stdin=subprocess.DEVNULL, start_new_session=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url, server, seconds=600)
        created = subprocess.run(
            ["./qubax", "keys", "create", "--test"], cwd=clone, env=env, capture_output=True, text=True, check=True
        )
        key = created.stdout.strip()
        assert key.startswith("qbx_test_") and "\n" not in key
        client = openai.OpenAI(api_key=key, base_url=f"{url}/v1")
        response = client.images.generate(
            model="flux-1.1-pro", prompt="a cat in space, photorealistic", n=1, size="1024x1024"
        )
        assert response.data[0].url is not None
        image = httpx.get(response.data[0].url)
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    # The one-node install serves SQLite and local disk without the clients for PostgreSQL, Redis and S3
    # (the extras), and a URL that needs one says which extra to install.
    python = str(clone / ".venv" / "bin" / "python")
    for module in ("asyncpg", "redis", "aiobotocore", "botocore"):
        found = subprocess.run([python, "-c", f"import {module}"], capture_output=True)
        assert found.returncode != 0, f"{module} is in the base install"
    qubax = str(clone / ".venv" / "bin" / "qubax")
    for variable, value, extra in [
        ("QUBAX_DATABASE_URL", "postgresql+asyncpg://u@127.0.0.1:9/q", "postgres"),
        ("QUBAX_REDIS_URL", "redis://127.0.0.1:9/0", "redis"),
        ("QUBAX_STORAGE_URL", "s3://bucket/images", "s3"),
    ]:
        done = subprocess.run([qubax, "serve"], env={**env, variable: value}, capture_output=True, text=True)
        assert done.returncode == 1
        assert done.stderr.strip() == (
            f"Error: {variable} needs the {extra} client, which is not installed: pip install 'qubax[{extra}]' "
            f"(./qubax installs it by itself when {variable} is set)."
        )


def test_where_the_readme_names_litellm_it_says_how_to_ask_for_base64() -> None:
    """LiteLLM's SDK refuses response_format="b64_json" for openai/… image models before sending;
    extra_body carries it through."""
    paragraph = next(p for p in (ROOT / "README.md").read_text().split("\n\n") if "LiteLLM" in p)
    assert 'extra_body={"response_format": "b64_json"}' in paragraph


PIP = """#!/usr/bin/env bash
# The venv's python, as far as ./qubax uses it: `-m pip install ...`, printing what pip prints.
case " $* " in *" --quiet "*) exit 0 ;; esac
echo "Obtaining file:///checkout"
echo "Collecting fastapi>=0.115 (from qubax==0.1.0)"
echo "  Downloading fastapi-0.115.0-py3-none-any.whl (94 kB)"
echo "Collecting uvicorn>=0.30 (from qubax==0.1.0)"
[ -z "${BROKEN_INDEX:-}" ] || { echo "ERROR: No matching distribution found for uvicorn>=0.30"; exit 1; }
echo "Installing collected packages: fastapi, uvicorn"
echo "Successfully installed fastapi-0.115.0 uvicorn-0.30.0"
"""


@pytest.mark.parametrize("broken", [False, True])
def test_the_first_run_of_the_checkout_script_shows_its_progress(tmp_path: Path, broken: bool) -> None:
    """./qubax installs itself on first use: each package pip fetches shows as it goes, and a failed
    install shows pip's whole output. (A stand-in for the venv's python plays pip.)"""
    script = tmp_path / "qubax"
    shutil.copy(ROOT / "qubax", script)
    (tmp_path / "pyproject.toml").write_text("")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text(PIP)
    (bin_dir / "qubax").write_text('#!/usr/bin/env bash\necho "qubax ran: $*"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUBAX_")} | {"BROKEN_INDEX": "1" if broken else ""}

    done = subprocess.run([str(script), "--version"], env=env, capture_output=True, text=True, timeout=60)

    assert "  Collecting fastapi>=0.115\n  Collecting uvicorn>=0.30\n" in done.stderr
    if broken:
        assert done.returncode == 1 and "ERROR: No matching distribution found" in done.stderr
    else:
        assert (done.returncode, done.stdout) == (0, "qubax ran: --version\n")
        assert "  Installing…\nInstalled.\n" in done.stderr
