"""How each server starts: the fake upstream, the floor, Qubax and LiteLLM proxy, each on a free port.

Each is a context manager that waits for the server's health check and stops its process group on exit.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench import procs

BIN = Path(sys.prefix) / "bin"
# Settings from the caller's shell that would change what a target does; each target gets only what we set.
SCRUBBED_PREFIXES = ("QUBAX_", "BFL_", "FAL_", "REPLICATE_", "TOGETHER_", "OPENAI_", "LITELLM_", "DATABASE_URL")
UPSTREAM_KEY = "bench"
LITELLM_MASTER_KEY = "sk-bench"


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    base: str  # http://127.0.0.1:PORT
    log: Path
    api_key: str = UPSTREAM_KEY


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED_PREFIXES)}, **extra}


@contextmanager
def running(
    cmd: list[str],
    health: str,
    port: int,
    log: Path,
    env: dict[str, str],
    timeout: float = 60.0,
    cwd: Path | None = None,
) -> Iterator[Server]:
    proc = procs.start(cmd, log, env, cwd)
    try:
        base = f"http://127.0.0.1:{port}"
        procs.wait_healthy(base + health, proc, log, timeout)
        yield Server(proc, base, log)
    finally:
        procs.stop(proc)


@contextmanager
def upstream(payload: str, workdir: Path, delay: float = 0.0) -> Iterator[Server]:
    port = procs.free_port()
    cmd = [sys.executable, "-m", "bench.upstream", "--port", str(port), "--payload", payload, "--delay", str(delay)]
    with running(cmd, "/health", port, workdir / f"upstream-{payload}.log", clean_env({})) as server:
        yield server


@contextmanager
def floor(upstream_base: str, workdir: Path, framework: str = "starlette") -> Iterator[Server]:
    port = procs.free_port()
    cmd = [sys.executable, "-m", "bench.floor", "--port", str(port), "--upstream", f"{upstream_base}/v1"]
    cmd += ["--framework", framework]
    with running(cmd, "/health", port, workdir / f"floor-{port}.log", clean_env({})) as server:
        yield server


def qubax_env(upstream_base: str, data_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Qubax's settings for a benchmark: its data folder, and `dall-e-3` routed to the fake upstream."""
    settings = {
        "QUBAX_DATA_DIR": str(data_dir),
        "OPENAI_API_KEY": UPSTREAM_KEY,
        "QUBAX_OPENAI_BASE_URL": f"{upstream_base}/v1",
    }
    return clean_env({**settings, **(extra or {})})


def create_key(env: dict[str, str]) -> str:
    """A live key in the data folder `env` names, through the CLI."""
    created = subprocess.run(
        [str(BIN / "qubax"), "keys", "create", "--name", "bench"], env=env, capture_output=True, text=True
    )
    if created.returncode != 0 or not created.stdout.strip():
        raise RuntimeError(f"qubax keys create failed ({created.returncode}): {created.stderr.strip()[-500:]}")
    return created.stdout.strip()


@contextmanager
def qubax(
    upstream_base: str,
    workdir: Path,
    images_dir: Path | None = None,
    settings: dict[str, str] | None = None,
    port: int | None = None,
) -> Iterator[Server]:
    """`qubax serve` as shipped (its default log level, access log on), with a fresh data dir and a live key;
    url-mode images in a fresh folder under `images_dir` when given; `settings`: more variables; on `port`
    (default: a free one)."""
    data_dir = Path(tempfile.mkdtemp(prefix="qubax-", dir=workdir))
    images = Path(tempfile.mkdtemp(prefix="qubax-images-", dir=images_dir)) if images_dir else None
    extra = {**(settings or {}), **({} if images is None else {"QUBAX_STORAGE_URL": f"file://{images}"})}
    env = qubax_env(upstream_base, data_dir, extra)
    key = create_key(env)
    port = port or procs.free_port()
    cmd = [str(BIN / "qubax"), "serve", "--port", str(port)]
    try:
        with running(cmd, "/healthz", port, data_dir / "serve.log", env) as server:
            server.api_key = key
            yield server
    finally:
        if images is not None:
            shutil.rmtree(images, ignore_errors=True)


@contextmanager
def litellm(exe: Path, upstream_base: str, workdir: Path) -> Iterator[Server]:
    """LiteLLM proxy with a master key and dall-e-3 on the fake upstream (JSON is valid YAML)."""
    config_dir = Path(tempfile.mkdtemp(prefix="litellm-", dir=workdir))
    config = {
        "model_list": [
            {
                "model_name": "dall-e-3",
                "litellm_params": {
                    "model": "openai/dall-e-3",
                    "api_base": f"{upstream_base}/v1",
                    "api_key": UPSTREAM_KEY,
                },
            }
        ],
        "general_settings": {"master_key": LITELLM_MASTER_KEY},
    }
    (config_dir / "config.yaml").write_text(json.dumps(config, indent=2))
    # The local cost map: LiteLLM would otherwise fetch it from GitHub at start.
    env = clean_env({"LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    port = procs.free_port()
    cmd = [str(exe), "--config", str(config_dir / "config.yaml"), "--host", "127.0.0.1", "--port", str(port)]
    with running(
        cmd, "/health/liveliness", port, config_dir / "litellm.log", env, timeout=180, cwd=config_dir
    ) as server:
        server.api_key = LITELLM_MASTER_KEY
        yield server
