"""Upstream plumbing shared by every adapter: sending, status mapping, polling and safe downloads."""

import asyncio
import binascii
import contextlib
import fnmatch
import json
import logging
import ssl
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import orjson
import pybase64

from qubax.errors import TaskFailed, UpstreamError, UpstreamTimeout
from qubax.providers import GeneratedImage, Upstream, journal, payload
from qubax.providers.pool import Waited, unwatched

T = TypeVar("T")
# A task that is already running (and billed) deserves more than one bad poll before we give up on it.
POLL_RETRIES = 5
logger = logging.getLogger("qubax")
# Below the 5 s after which uvicorn and Node close an idle connection (a self-hosted OpenAI-compatible
# host): a server that closes first races our next POST on that connection, which fails and is not
# sent again, as it may have arrived. A new connection costs a handshake, nothing beside an image's
# seconds. (aiohttp's own 15 s lost 1,075 requests in a second against such a host, bench/README.md.)
KEEPALIVE_SECONDS = 4.0
CANCEL_TIMEOUT = 5.0  # seconds a best-effort cancel may take once our caller has gone


@dataclass(frozen=True)
class Reply:
    """An upstream's whole answer: status, headers and body (read in full, within MAX_BODY_BYTES)."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes

    def json(self) -> Any:
        """The body as JSON; raises ValueError when it is not."""
        return payload.loads(self.content)


@dataclass(frozen=True)
class Timeouts:
    connect: float = 10.0  # to open a connection (TCP, TLS, a proxy's tunnel)
    # Of silence while an answer is awaited or read. Synchronous upstreams (Together, OpenAI) answer
    # only once the image is made, so this must outlast a generation.
    read: float = 120.0
    # For an asynchronous upstream (BFL, fal, Replicate) to accept a submission, all told. They answer
    # with a task id at once; one that does not is failing, and another route should have the work.
    submit: float = 30.0


@dataclass(frozen=True)
class Http:
    """The one upstream HTTP session of an app, and the proxies the environment named when it opened."""

    session: aiohttp.ClientSession
    proxies: Mapping[str, str]  # scheme -> proxy URL, as urllib reads HTTP_PROXY / HTTPS_PROXY / NO_PROXY
    timeouts: Timeouts = Timeouts()
    waited: Waited = unwatched  # told of each wait for a connection, and for a provider's slot (`KeyPool`)

    def proxy(self, url: str) -> str | None:
        """The proxy for this URL, or None when it goes direct (no proxy for its scheme, or NO_PROXY)."""
        if not self.proxies:
            return None
        parts = urlsplit(url)
        proxy = self.proxies.get(parts.scheme) if parts.scheme != "no" else None
        # The standard library's own NO_PROXY matching (urllib uses it; typeshed leaves it out).
        if proxy is None or urllib.request.proxy_bypass_environment(parts.netloc, self.proxies):  # type: ignore[attr-defined]
            return None
        return proxy


@contextlib.asynccontextmanager
async def open_session(
    timeouts: Timeouts = Timeouts(), connections: int = 0, waited: Waited = unwatched
) -> AsyncIterator[Http]:
    """The one upstream HTTP session of an app. Proxies come from HTTP_PROXY / HTTPS_PROXY / NO_PROXY and
    trusted CAs from SSL_CERT_FILE / SSL_CERT_DIR, as read when the session opens. At most `connections`
    at once (0: no cap; more wait for one, within the request's deadline, and each wait is logged and
    told to `waited`); idle ones close after KEEPALIVE_SECONDS, before servers close theirs. A GET, PUT or DELETE
    whose kept-alive connection turns out closed is sent once more on a new one (aiohttp does this); a
    POST is not, as it may have arrived.

    Not aiohttp's `trust_env`: besides proxies it sends ~/.netrc credentials to any host they name
    (every download included), and looks both up in a thread on every request."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect, sock_read=timeouts.read)
    connector = aiohttp.TCPConnector(
        limit=connections, ssl=ssl.create_default_context(), keepalive_timeout=KEEPALIVE_SECONDS
    )
    found = urllib.request.getproxies_environment()
    proxies: dict[str, str] = {name: found[name] for name in ("http", "https", "no") if name in found}
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        cookie_jar=aiohttp.DummyCookieJar(),  # upstreams authenticate by key; cookies would leak between keys
        headers={"user-agent": "qubax"},
        # Without a cap nothing ever queues: no tracing, which every request would pay for.
        trace_configs=[queue_watch(connections, waited)] if connections else None,
    ) as session:
        yield Http(session, proxies, timeouts, waited)


def queue_watch(connections: int, waited: Waited) -> aiohttp.TraceConfig:
    """aiohttp's hooks around a request queued for a free connection: the wait is logged and counted."""

    async def queued(session: aiohttp.ClientSession, context: Any, params: object) -> None:
        context.queued = asyncio.get_running_loop().time()

    async def dequeued(session: aiohttp.ClientSession, context: Any, params: object) -> None:
        seconds = asyncio.get_running_loop().time() - context.queued
        upstream = (context.trace_request_ctx or {}).get("upstream", "")
        logger.info("%s: waited %.2f s for a connection (at most %d at once)", upstream, seconds, connections)
        waited(upstream, "connection", seconds)

    watch = aiohttp.TraceConfig()
    watch.on_connection_queued_start.append(queued)
    watch.on_connection_queued_end.append(dequeued)
    return watch


async def send(
    http: Http,
    provider: str,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    json: Any = None,
    form: aiohttp.FormData | None = None,
    submission: bool = False,
    events: Callable[[Any], None] | None = None,
) -> Reply:
    """Send one request and read the whole answer, turning transport failures into our errors.
    Redirects are never followed: adapters vet every host they send a key or a download to.

    With `events`, a successful `text/event-stream` answer is read event by event as it arrives: each
    event's JSON data goes to `events`, and the last one is the Reply's content.

    A `submission` (work handed to an asynchronous upstream) must be answered within `timeouts.submit`;
    past it the upstream is taken not to have accepted the work, and another route may take it. (Should
    it have accepted it after all, that task is lost to us: we never learned its id.)"""
    if json is not None:
        headers = {**(headers or {}), "content-type": "application/json"}
    data = form if json is None else orjson.dumps(json)  # a form streams its files as it is sent
    try:
        # Only a submission has a deadline of its own: an `asyncio.timeout(None)` costs as much as a real one.
        async with asyncio.timeout(http.timeouts.submit) if submission else contextlib.nullcontext():
            request = http.session.request(
                method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                proxy=http.proxy(url),
                trace_request_ctx={"upstream": provider},
            )
            async with request as response:
                if events is not None and response.status < 300 and response.content_type == "text/event-stream":
                    return Reply(response.status, response.headers, await read_events(response, events))
                return Reply(response.status, response.headers, await read_body(response))
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, aiohttp.InvalidURL, ValueError) as exc:
        # Nothing reached the upstream (no connection, or a URL or header we could not send): another
        # route can safely take the work.
        detail = f"Could not reach {provider}: {describe(exc)}."
        raise UpstreamError(f"Could not reach {provider}.", detail=detail, retryable=True) from exc
    except aiohttp.SocketTimeoutError as exc:
        # It has the request (and may bill it) but went silent: the client may retry, we do not re-route.
        message = f"{provider} sent nothing for {http.session.timeout.sock_read:g} seconds."
        raise UpstreamError(message, retryable=True, failover=False) from exc
    except TimeoutError as exc:  # only a submission's own limit: aiohttp's timeouts are caught above
        message = f"{provider} did not accept the work within {http.timeouts.submit:g} seconds."
        raise UpstreamTimeout(message, retryable=True, failover=True) from exc
    except AnswerTooLarge as exc:
        raise UpstreamError(f"{provider} sent a response larger than we accept.") from exc
    except aiohttp.ClientError as exc:
        # The request may have arrived (and been billed): the client may retry, we do not re-route.
        detail = f"{provider} connection failed: {describe(exc)}."
        raise UpstreamError(f"{provider} connection failed.", detail=detail, retryable=True, failover=False) from exc


MAX_BODY_BYTES = 64 * 1024 * 1024  # of any one answer, JSON or image
DETAIL_CHARS = 500  # of an upstream's own error text kept for the operator


class AnswerTooLarge(Exception):
    pass


async def read_body(response: aiohttp.ClientResponse) -> bytes:
    """The whole body, up to MAX_BODY_BYTES after decompression."""
    declared = response.content_length
    if declared is not None and declared > MAX_BODY_BYTES:
        raise AnswerTooLarge
    if declared is not None and "content-encoding" not in response.headers:
        return await response.read()  # one buffer, its size known and within the cap
    chunks, size = [], 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise AnswerTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def read_events(response: aiohttp.ClientResponse, events: Callable[[Any], None]) -> bytes:
    """Server-sent events (aiohttp has no reader for them): blocks of lines ended by a blank line, each
    `data:` line part of the event's data, which here is JSON. No block may pass MAX_BODY_BYTES. The
    last event's data is returned. An event may be megabytes (a whole image): each byte is scanned once."""
    buffer, scanned, carried, last = bytearray(), 0, b"", b""
    async for chunk in response.content.iter_any():
        chunk = carried + chunk  # a CR at a chunk's end may begin a CRLF
        carried = b"\r" if chunk.endswith(b"\r") else b""
        buffer += chunk[: len(chunk) - len(carried)].replace(b"\r\n", b"\n")
        while (end := buffer.find(b"\n\n", max(scanned - 1, 0))) != -1:
            last = pass_on(bytes(buffer[:end]), events) or last
            del buffer[: end + 2]
            scanned = 0
        scanned = len(buffer)
        if scanned > MAX_BODY_BYTES:
            raise AnswerTooLarge
    return last


def pass_on(block: bytes, events: Callable[[Any], None]) -> bytes:
    """One event's data, parsed and handed to `events`; returned (empty for a comment or `[DONE]`)."""
    data = b"\n".join(line[5:].removeprefix(b" ") for line in block.split(b"\n") if line.startswith(b"data:"))
    if not data or data == b"[DONE]":
        return b""
    try:
        event = payload.loads(data)
    except ValueError:
        raise UpstreamError("The upstream sent an unreadable event.", failover=False) from None
    events(event)
    return data


def describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):  # its own text repeats the address in a long phrase
        return f"{type(exc.os_error).__name__} ({exc.host}:{exc.port})"
    return str(exc) or type(exc).__name__


def check_status(response: Reply, provider: str) -> None:
    """Raise the error a non-2xx upstream answer means; adapters handle provider quirks first. The client
    learns the status and whether a retry can help; the state of the operator's account with the
    provider, and the upstream's own words, go to the error's `detail`."""
    status = response.status_code
    if status < 300:
        return
    if status in (401, 403):
        message, diagnosis = "could not serve the request", "the configured credential was rejected: "
    elif status == 402:
        message, diagnosis = "could not serve the request", "the account is out of credit: "
    elif status == 429:
        message, diagnosis = "is over its rate limit", "rate limited: "
    else:
        message, diagnosis = ("failed" if status >= 500 else "refused the request"), ""
    retryable = status == 429 or status >= 500
    # A refused credential or an empty account is this route's problem: another route may still serve.
    failover = retryable or status in (401, 402, 403)
    detail = diagnosis + (error_detail(response) or "(no message)")
    raise UpstreamError(
        f"{provider} {message} ({status}).",
        detail=detail,
        retryable=retryable,
        failover=failover,
        deterministic=status in (400, 422),  # the request itself: sent again, it is refused again
    )


def error_detail(response: Reply) -> str:
    """The upstream's own error message, short, whatever shape its body has."""
    try:
        body = response.json()
    except ValueError:
        return ""
    found: Any = body
    if isinstance(body, dict):
        for key in ("error", "detail", "message", "title"):
            if body.get(key):
                found = body[key]
                break
    if isinstance(found, dict):
        found = found.get("message") or found.get("msg") or found
    if isinstance(found, list) and found and isinstance(found[0], dict):  # FastAPI-style validation errors
        field = ".".join(str(part) for part in found[0].get("loc", [])[1:])
        found = f"{field}: {found[0].get('msg')}" if field else found[0].get("msg", found[0])
    return str(found)[:DETAIL_CHARS]


def read_json(response: Reply, provider: str) -> dict[str, Any]:
    """The JSON object the upstream returned, or an error that says it sent something else."""
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        # Nothing usable came back, so nothing was handed over; inside `billed()` this becomes final.
        raise UpstreamError(f"{provider} returned an unreadable response (not a JSON object).", failover=True)
    return body


async def poll(check: Callable[[], Awaitable[T | None]], interval: float) -> T:
    """Call `check` until it returns a value; the caller's deadline bounds the wait.

    Transient failures (retryable errors) are retried with growing pauses, a few times in a row.
    """
    failures = 0
    while True:
        try:
            result = await check()
        except UpstreamError as exc:
            failures += 1
            if not exc.retryable or failures > POLL_RETRIES:
                raise
            await asyncio.sleep(interval * 2**failures)
            continue
        failures = 0
        if result is not None:
            return result
        await asyncio.sleep(interval)


def resumable(provider: str, model: str, count: int) -> dict[str, Any] | None:
    """A task for this work that a node which died had started (`TaskJournal`): wait on it again."""
    noted = journal.get()
    return None if noted is None else noted.take(provider, model, count)


async def accepted(upstream: Upstream, key: str, provider: str, model: str, count: int, handle: dict[str, Any]) -> None:
    """Note a task the upstream accepted under `key`, durably, before anyone waits on it; the note names
    the key by its digest, which `Upstream.lease(task)` leases again."""
    noted = journal.get()
    if noted is not None:
        await noted.record(provider, model, count, handle | {"key": upstream.key_name(key)})


async def fan_out(calls: Iterable[Awaitable[list[GeneratedImage]]]) -> list[GeneratedImage]:
    """Run calls concurrently, to the end: an image one call made survives a sibling's failure.

    When any call failed, raise the most decisive failure (a refusal before an upstream error, one that
    forbids failover before one that allows it), carrying the images the other calls made.
    """
    pending = list(calls)
    if len(pending) == 1:  # the common n=1 case: no gather, no extra task
        return await pending[0]
    results = await asyncio.gather(*pending, return_exceptions=True)
    images = [image for result in results if isinstance(result, list) for image in result]
    errors = [result for result in results if isinstance(result, BaseException)]
    if not errors:
        return images
    error = min(errors, key=decisiveness)
    if isinstance(error, UpstreamError):
        # Calls that failed part-way (a batch short of images) keep what they made too.
        error.images = images + [image for e in errors if isinstance(e, UpstreamError) for image in e.images]
    raise error


def decisiveness(error: BaseException) -> int:
    """Lower wins: refusals and crashes, then failures that forbid failover, then the rest."""
    if not isinstance(error, UpstreamError):
        return 0
    return 2 if error.failover else 1


class billed:  # lower case: used like the function it was, `with billed():`
    """Failures inside come after the upstream accepted (and may bill) the work: no failover for them,
    unless the upstream itself says the task failed. A class rather than `contextlib.contextmanager`,
    whose generator is measurably dearer on the hot path (bench/README.md)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        if isinstance(error, UpstreamError) and not isinstance(error, TaskFailed):
            error.failover = False


def decode_b64(text: Any, provider: str) -> bytes:
    """Image bytes from an upstream's inline base64 field."""
    try:
        # pybase64 (SIMD) decodes big images far faster than the standard library (bench/README.md).
        data = pybase64.b64decode(text, validate=True) if isinstance(text, str) else b""
    except (binascii.Error, ValueError):
        data = b""
    if not data:
        raise UpstreamError(f"{provider} returned image data that is not valid base64.")
    return data


DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL, the port spelled out; None for anything else."""
    parts = urlsplit(url)
    try:
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:  # a port that is no number
        return None
    host = (parts.hostname or "").lower()
    return (parts.scheme, host, port) if port is not None and host else None


def trusted(url: str, patterns: Iterable[str], base_url: str) -> bool:
    """Whether a URL an upstream handed us may get our key, or be downloaded: the configured base URL's
    own origin (scheme, host and port alike: the provider, a proxy, or a fake in tests), or https on the
    standard port to a host matching one of the provider's shell-style patterns (`delivery.*.bfl.ai`).
    Never plain http, nor another port of a trusted host."""
    found = origin(url)
    if found is None:
        return False
    if found == origin(base_url):
        return True
    scheme, host, port = found
    return scheme == "https" and port == 443 and any(fnmatch.fnmatchcase(host, pattern.lower()) for pattern in patterns)


def base_host(base_url: str) -> str:
    return (urlsplit(base_url).hostname or "").lower()


async def cancel_quietly(http: Http, method: str, url: str, headers: Mapping[str, str]) -> None:
    """Best-effort cancel of upstream work nobody will collect, even while our own task is being
    cancelled: shielded, bounded, and its failures ignored."""
    with contextlib.suppress(Exception):
        await asyncio.shield(asyncio.wait_for(send(http, "upstream", method, url, headers=headers), CANCEL_TIMEOUT))


async def download(upstream: Upstream, provider: str, url: Any) -> bytes:
    """Fetch a result URL, but only from where the provider delivers from (no SSRF via upstream data)."""
    if not isinstance(url, str) or not trusted(url, upstream.delivery_hosts, upstream.base_url):
        raise UpstreamError(f"{provider} returned a result URL from a host we do not download from.")
    try:
        response = await send(upstream.http, provider, "GET", url, headers={"user-agent": "qubax"})
    except UpstreamError as exc:
        exc.message = f"Downloading the image from {provider} failed: {exc.message}"
        exc.detail = exc.detail and f"Downloading the image from {provider} failed: {exc.detail}"
        raise
    if response.status_code != 200:
        # 403/404/410 mean the signed URL expired or never existed: asking again cannot help.
        busy = response.status_code == 429 or response.status_code >= 500
        raise UpstreamError(f"Downloading the image from {provider} failed ({response.status_code}).", retryable=busy)
    return response.content
