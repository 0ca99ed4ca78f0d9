"""The playground: a prompt (and for a model that edits, an image) made into images under a key the
operator picks (a test key by default), as the API would make them: through the key's limits, the
routes and the ledger. It shows the images as they arrive (streamed to the page's script; without
script, the form is answered when they are all made), the route that made them, the time and the cost."""

import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated

import orjson
from fastapi import Form, Request, Response, UploadFile
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel, Field
from sqlalchemy import select

from qubax.api.bodies import UploadRequest, UploadRoute
from qubax.console.sessions import ActionSession, PageSession, signed_in
from qubax.console.web import ConsoleRoute, page, router, usd
from qubax.errors import NotFound, QubaxError
from qubax.pipeline import delivery, parsing
from qubax.pipeline.work import Work
from qubax.protocol import ImageEditRequest, ImageGenerateRequest
from qubax.records import queries, tables
from qubax.routing.request import ImageRequest
from qubax.server.services import Services, ServicesDep

FORMATS = ("png", "jpeg", "webp")


class Asked(BaseModel):
    """The playground's form."""

    key_id: str
    model: str
    prompt: str
    size: str = ""
    n: int = Field(1, ge=1, le=10)
    output_format: str = "png"
    image: UploadFile | None = None

    def fields(self, stream: bool) -> dict[str, object]:
        fields = {"model": self.model, "prompt": self.prompt, "n": self.n, "size": self.size or None}
        return fields | {"output_format": self.output_format, "response_format": "b64_json", "stream": stream}

    @property
    def upload(self) -> UploadFile | None:
        return self.image if self.image is not None and self.image.filename else None


@router.get("/playground")
async def playground_page(request: Request, console: PageSession, services: ServicesDep) -> Response:
    return await show(request, console, services, {"n": "1", "output_format": "png"})


class PlaygroundRoute(ConsoleRoute, UploadRoute):
    """The playground's form takes an upload: bounded like the API's, and read only once the console
    session is known (its CSRF token comes with the form)."""

    request_class = UploadRequest

    async def admit(self, request: Request) -> None:
        await signed_in(request)


async def make(
    request: Request, console: ActionSession, services: ServicesDep, asked: Annotated[Asked, Form()]
) -> Response:
    shown = asked.model_dump(exclude={"image"}) | {"n": str(asked.n)}
    started = time.monotonic()
    try:
        key = await key_record(services, asked.key_id)
        made, _ = await delivery.answered(Work(request=await check(services, asked, False), key=key), services)
    except QubaxError as exc:
        return await show(request, console, services, shown, error=exc.message)
    seconds = time.monotonic() - started
    media = f"image/{asked.output_format if asked.output_format in FORMATS else 'png'}"
    texts = [item.b64_json for item in made.response.data if item.b64_json]
    images = [f"data:{media};base64,{text if isinstance(text, str) else text.decode()}" for text in texts]
    result = {"images": images, "route": made.upstream, "seconds": f"{seconds:.1f}", "cost_micros": made.cost_micros}
    return await show(request, console, services, shown, result=result)


async def make_streamed(console: ActionSession, services: ServicesDep, asked: Annotated[Asked, Form()]) -> Response:
    """The same, as OpenAI's streamed events, then a `qubax.summary` event: route, seconds, cost."""
    key = await key_record(services, asked.key_id)
    checked = await check(services, asked, True)
    started, since = time.monotonic(), tables.now()
    answer = await delivery.run(Work(request=checked, key=key, delivery="stream"), services)
    assert answer.events is not None  # a stream's
    return EventSourceResponse(
        summarised(answer.events, services, key, checked, started, since), headers=answer.headers
    )


router.add_api_route("/playground", make, methods=["POST"], route_class_override=PlaygroundRoute)
router.add_api_route("/playground/stream", make_streamed, methods=["POST"], route_class_override=PlaygroundRoute)


async def check(services: Services, asked: Asked, stream: bool) -> ImageRequest:
    if asked.upload is not None:
        form = ImageEditRequest.model_validate(asked.fields(stream) | {"image": [asked.upload]})
        return await parsing.check_edit(form, services)
    return parsing.check_generation(ImageGenerateRequest.model_validate(asked.fields(stream)), services)


async def summarised(
    events: AsyncIterator[bytes],
    services: Services,
    key: tables.KeyRecord,
    request: ImageRequest,
    started: float,
    since: datetime,
) -> AsyncIterator[bytes]:
    """The stream's events, then what its usage record says (written before the last event was sent)."""
    async for event in events:
        yield event
    query = (
        select(tables.Generation)
        .where(
            tables.Generation.key_id == key.id,
            tables.Generation.model == request.model.id,
            tables.Generation.created_at >= since,
        )
        .order_by(tables.Generation.id.desc())
        .limit(1)
    )
    async with services.sessions() as session:
        record = await session.scalar(query)
    if record is not None:
        summary = {
            "route": record.upstream,
            "seconds": f"{time.monotonic() - started:.1f}",
            "cost": usd(record.cost_micros),
        }
        yield format_sse_event(event="qubax.summary", data_str=orjson.dumps(summary).decode())


async def show(
    request: Request,
    console: tables.ConsoleSession,
    services: Services,
    asked: dict[str, str],
    **outcome: object,
) -> Response:
    async with services.sessions() as session:
        keys = [key for key in await queries.list_keys(session) if key.revoked_at is None]
    keys.sort(key=lambda key: not key.test)  # test keys first: the default costs nothing
    models = services.catalog.models
    return page(
        request, "playground.html", console, title="Playground", keys=keys, models=models, asked=asked,
        formats=FORMATS, **outcome,
    )  # fmt: skip


async def key_record(services: Services, key_id: str) -> tables.KeyRecord:
    async with services.sessions() as session:
        key = await queries.find_key_by(session, key_id=key_id)
    if key is None or key.revoked_at is not None:
        raise NotFound("Pick a key that exists and is not revoked.", param="key_id")
    return tables.key_record(key)
