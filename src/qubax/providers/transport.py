"""The one upstream HTTP session of an app, and sending a request on it: proxies, TLS, connection
limits and timeouts, and transport failures turned into our errors."""

import asyncio
import contextlib
import logging
import ssl
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from qubax.errors import UpstreamError, UpstreamTimeout
from qubax.providers.events import read_events
from qubax.providers.pool import Waited, unwatched
from qubax.providers.replies import AnswerTooLarge, Reply, read_body

logger = logging.getLogger("qubax")
# Below the 5 s after which uvicorn and Node close an idle connection (a self-hosted OpenAI-compatible
# host): a server that closes first races our next POST on that connection, which fails and is not
# sent again, as it may have arrived. A new connection costs a handshake, nothing beside an image's
# seconds. (aiohttp's own 15 s lost 1,075 requests in a second against such a host, bench/README.md.)
KEEPALIVE_SECONDS = 4.0


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


def describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):  # its own text repeats the address in a long phrase
        return f"{type(exc.os_error).__name__} ({exc.host}:{exc.port})"
    return str(exc) or type(exc).__name__
