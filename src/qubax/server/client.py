"""`qubax generate`: the command line as a client of a running server, through its public API."""

import asyncio
import base64
import contextlib
import itertools
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click
import httpx
import platformdirs

T = TypeVar("T")
JOB_POLL_SECONDS = 1.0
TIMEOUT = httpx.Timeout(900.0, connect=10.0)


@click.command()
@click.argument("prompt")
@click.option("--model", default="flux-1.1-pro", show_default=True)
@click.option("--size", default=None, help="WIDTHxHEIGHT; the model's default when omitted.")
@click.option("-n", "n", default=1, show_default=True, type=int)
@click.option(
    "--out",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="The folder to save in. Default: a qubax folder in your Pictures folder, else in Qubax's data folder.",
)
@click.option("--base-url", default="http://127.0.0.1:8000/v1", show_default=True)
@click.option("--api-key", envvar="QUBAX_API_KEY", help="Or set QUBAX_API_KEY.")
@click.option("--async", "as_job", is_flag=True, help="Send it as a job (Prefer: respond-async) and wait on the job.")
def generate(
    prompt: str,
    model: str,
    size: str | None,
    n: int,
    out: Path | None,
    base_url: str,
    api_key: str | None,
    as_job: bool,
) -> None:
    """Generate images on a running server and save them as PNG files."""
    if not api_key:
        raise click.UsageError(
            "No API key: pass --api-key or set QUBAX_API_KEY (`qubax keys create --test` makes one to try)."
        )
    body: dict[str, Any] = {"model": model, "prompt": prompt, "n": n, "response_format": "b64_json"}
    if size:
        body["size"] = size
    base_url = base_url.rstrip("/")
    with reaching(f"{base_url}/images/generations"):
        answer = asyncio.run((wait_on_job if as_job else post)(base_url, body, api_key))
    if out is None:
        out = default_folder()
        click.echo(f"Saving in {out} (--out chooses another folder).", err=True)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)  # two runs in one second must not collide
    for index, item in enumerate(answer["data"], start=1):
        path = out / f"{model}-{stamp}-{index}.png"
        path.write_bytes(base64.b64decode(item["b64_json"]))
        click.echo(str(path))


def default_folder() -> Path:
    """Where images go without --out: the platform's pictures folder, else Qubax's data folder (a server,
    say, has no pictures folder)."""
    pictures = Path(platformdirs.user_pictures_dir())
    if pictures.is_dir():
        return pictures / "qubax"
    return Path(os.environ.get("QUBAX_DATA_DIR") or platformdirs.user_data_dir("qubax")) / "generated"


async def post(base_url: str, body: dict[str, Any], api_key: str) -> dict[str, Any]:
    """The ImagesResponse of one request, a progress indicator shown while it runs."""
    async with client(base_url, api_key) as http:
        return answer_of(await with_progress(http.post("/images/generations", json=body), lambda: "generating"))


async def wait_on_job(base_url: str, body: dict[str, Any], api_key: str) -> dict[str, Any]:
    """The ImagesResponse of a job: submitted, then watched (its status shown) until it ends."""
    async with client(base_url, api_key) as http:
        job = answer_of(await http.post("/images/generations", json=body, headers={"prefer": "respond-async"}), 202)
        click.echo(f"job {job['id']}", err=True)

        async def watch() -> dict[str, Any]:
            nonlocal job
            while job["status"] in ("queued", "in_progress"):
                await asyncio.sleep(JOB_POLL_SECONDS)
                job = answer_of(await http.get(f"/images/jobs/{job['id']}"))
            return job

        ended = await with_progress(watch(), lambda: job["status"].replace("_", " "))
    if ended["status"] != "succeeded":
        error = ended.get("error") or {}
        raise click.ClickException(f"The job {ended['status']}: {error.get('message', '')}".rstrip(": "))
    result: dict[str, Any] = ended["result"]
    return result


def served_models(base_url: str, api_key: str) -> set[str] | None:
    """The model names a running server offers this key (GET /v1/models); None when none answers there."""
    try:
        response = httpx.get(
            f"{base_url.rstrip('/')}/models", headers={"authorization": f"Bearer {api_key}"}, timeout=5.0
        )
    except httpx.HTTPError:
        return None
    try:
        return {model["id"] for model in answer_of(response)["data"]}
    except click.ClickException as exc:  # a wrong key, say: which server said so
        raise click.ClickException(f"The server at {base_url} refused to list its models: {exc.message}") from exc


def client(base_url: str, api_key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, headers={"authorization": f"Bearer {api_key}"}, timeout=TIMEOUT)


def answer_of(response: httpx.Response, expected: int = 200) -> dict[str, Any]:
    payload = response.json() if response.headers.get("content-type", "").endswith("json") else {}
    if response.status_code != expected:
        message = payload.get("error", {}).get("message") if isinstance(payload, dict) else None
        raise click.ClickException(f"{response.status_code}: {message or response.text[:200]}")
    answer: dict[str, Any] = payload
    return answer


@contextlib.contextmanager
def reaching(url: str) -> Iterator[None]:
    """The server's address and a hint in place of a traceback, when it cannot be reached."""
    try:
        yield
    except httpx.ConnectError as exc:
        hint = "Is the server running? Start it with `qubax serve` (or pass --base-url)."
        raise click.ClickException(f"Could not reach {url}: {exc}. {hint}") from exc
    except httpx.HTTPError as exc:
        raise click.ClickException(f"Could not reach {url}: {exc}") from exc


async def with_progress(work: Awaitable[T], doing: Callable[[], str]) -> T:
    task = asyncio.ensure_future(work)
    spinner = asyncio.create_task(spin(task, doing))
    try:
        return await task
    finally:
        await spinner


async def spin(task: "asyncio.Future[Any]", doing: Callable[[], str]) -> None:
    """A progress indicator on stderr, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        return
    started = time.monotonic()
    for frame in itertools.cycle("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"):
        if task.done():
            break
        sys.stderr.write(f"\r{frame} {doing()}… {time.monotonic() - started:4.0f}s   ")
        sys.stderr.flush()
        await asyncio.sleep(0.1)
    sys.stderr.write("\r" + " " * 40 + "\r")
