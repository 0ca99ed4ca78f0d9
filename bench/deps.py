"""Install what the benchmark needs, once: wrk, fast server/client libraries, and LiteLLM in its own venv."""

import importlib.util
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
LITELLM_VENV = BENCH_DIR / ".venv-litellm"
# Installed into the project's .venv (not declared in pyproject): the fake upstream and the floor use them.
BENCH_PACKAGES = {"aiohttp": "aiohttp", "uvloop": "uvloop", "httptools": "httptools"}


def ensure_bench_packages() -> None:
    missing = [pip_name for module, pip_name in BENCH_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(f"installing into {sys.prefix}: {' '.join(missing)}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    print("installing wrk with apt-get", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, stdout=subprocess.DEVNULL)
    found = shutil.which("wrk")
    if not found:
        raise RuntimeError("wrk is not on PATH after apt-get install")
    return found


def ensure_litellm() -> tuple[Path | None, str, float]:
    """The litellm executable (or None), a note (version, or why it is unavailable), and install seconds."""
    exe = LITELLM_VENV / "bin" / "litellm"
    python = LITELLM_VENV / "bin" / "python"
    started, reused = time.monotonic(), exe.exists()
    if not reused:
        print(f"installing litellm[proxy] into {LITELLM_VENV} (once)", flush=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
            subprocess.run(
                [str(python), "-m", "pip", "install", "-q", "litellm[proxy]"],
                check=True,
                capture_output=True,
                text=True,
            )
        except subprocess.CalledProcessError as exc:
            tail = (exc.stderr or "").strip().splitlines()[-3:]
            return None, f"install failed: {' | '.join(tail) or exc}", time.monotonic() - started
    seconds = time.monotonic() - started
    if not exe.exists():
        return None, "install finished but bin/litellm is missing", seconds
    version = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    how = f"bench/{LITELLM_VENV.name} reused" if reused else f"installed in {seconds:.0f}s"
    return exe, f"litellm {version or '?'} ({how})", seconds
