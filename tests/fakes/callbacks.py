"""How the fake upstreams call back when a task ends (BFL's `webhook_url`, fal's `fal_webhook`,
Replicate's `webhook`): a POST of the provider's body to the URL the submission named, after the task
has ended. A `CallingBack` fake can drop its callbacks (`drop_callbacks`), as a lost one would be."""

import asyncio
import datetime
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from standardwebhooks import Webhook

REPLICATE_SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # the fake account's signing secret


@dataclass
class CallingBack:
    # A task submitted with a callback URL ends this many seconds later, however often it is polled,
    # and then its callback is sent (unless dropped).
    callback_delay: float = 0.3
    drop_callbacks: bool = False
    # Where callbacks really go: this origin in place of the URL's own (a proxy in front of the nodes,
    # in effect), as a test learns the app's address only once it serves.
    callback_to: str | None = None
    callbacks: list[tuple[str, int]] = field(default_factory=list)  # URL, our answer's status
    pending: set["asyncio.Task[None]"] = field(default_factory=set)

    def later(self, end: Callable[[], dict[str, Any]], url: str, sign: bool = False) -> None:
        """After `callback_delay`, end the task (`end` gives the callback's body) and call `url`."""
        task = asyncio.create_task(self._call_back(end, url, sign))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _call_back(self, end: Callable[[], dict[str, Any]], url: str, sign: bool) -> None:
        await asyncio.sleep(self.callback_delay)
        body = orjson.dumps(end())
        if self.drop_callbacks:
            return
        if self.callback_to is not None:
            url = self.callback_to + "/" + url.split("/", 3)[3]
        headers = {"content-type": "application/json"} | (signed(body) if sign else {})
        self.callbacks.append((url, await post(url, body, headers)))


def signed(body: bytes) -> dict[str, str]:
    """The headers that sign `body` as Replicate signs its webhooks (Standard Webhooks)."""
    message_id, now = f"msg_{uuid.uuid4().hex}", datetime.datetime.now(datetime.UTC)
    signature = Webhook(REPLICATE_SECRET).sign(message_id, now, body.decode())
    return {"webhook-id": message_id, "webhook-timestamp": str(int(now.timestamp())), "webhook-signature": signature}


async def post(url: str, body: bytes, headers: dict[str, str]) -> int:
    """The status our app answered, or 0 when it could not be reached (a lost callback, in effect)."""
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            return (await client.post(url, content=body, headers=headers)).status_code
    except httpx.HTTPError:
        return 0
