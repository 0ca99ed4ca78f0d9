"""The playground: a prompt (and for a model that edits, an image) made into images under a key the
operator picks (a test key by default), as the API would make them: through the key's limits, the
routes and the ledger. It shows the images, the route that made them, the time and the cost."""

import time
from typing import Annotated

from fastapi import File, Form, Request, Response, UploadFile

from qubax import db, generation
from qubax.console.sessions import ActionSession, PageSession
from qubax.console.web import page, router
from qubax.errors import NotFound, QubaxError
from qubax.protocol import ImageEditRequest, ImageGenerateRequest
from qubax.services import Services, ServicesDep

FORMATS = ("png", "jpeg", "webp")


@router.get("/playground")
async def playground_page(request: Request, console: PageSession, services: ServicesDep) -> Response:
    return await show(request, console, services, {"n": "1", "output_format": "png"})


@router.post("/playground")
async def make(
    request: Request,
    console: ActionSession,
    services: ServicesDep,
    key_id: Annotated[str, Form()],
    model: Annotated[str, Form()],
    prompt: Annotated[str, Form()],
    size: Annotated[str, Form()] = "",
    n: Annotated[int, Form(ge=1, le=10)] = 1,
    output_format: Annotated[str, Form()] = "png",
    image: Annotated[UploadFile | None, File()] = None,
) -> Response:
    asked = {
        "key_id": key_id,
        "model": model,
        "prompt": prompt,
        "size": size,
        "n": str(n),
        "output_format": output_format,
    }
    fields = {"model": model, "prompt": prompt, "n": n, "size": size or None, "output_format": output_format}
    fields |= {"response_format": "b64_json"}
    upload = image if image is not None and image.filename else None
    started = time.monotonic()
    try:
        key = await key_record(services, key_id)
        if upload is not None:
            made = await generation.edit(
                ImageEditRequest.model_validate(fields | {"image": [upload]}), key, services, ""
            )
        else:
            made = await generation.generate(ImageGenerateRequest.model_validate(fields), key, services, "")
    except QubaxError as exc:
        return await show(request, console, services, asked, error=exc.message)
    seconds = time.monotonic() - started
    media = f"image/{output_format if output_format in FORMATS else 'png'}"
    images = [f"data:{media};base64,{item.b64_json}" for item in made.response.data if item.b64_json]
    result = {"images": images, "route": made.upstream, "seconds": f"{seconds:.1f}", "cost_micros": made.cost_micros}
    return await show(request, console, services, asked, result=result)


async def show(
    request: Request,
    console: db.ConsoleSession,
    services: Services,
    asked: dict[str, str],
    **outcome: object,
) -> Response:
    async with services.sessions() as session:
        keys = [key for key in await db.list_keys(session) if key.revoked_at is None]
    keys.sort(key=lambda key: not key.test)  # test keys first: the default costs nothing
    models = services.catalog.models
    return page(
        request, "playground.html", console, title="Playground", keys=keys, models=models, asked=asked,
        formats=FORMATS, **outcome,
    )  # fmt: skip


async def key_record(services: Services, key_id: str) -> db.KeyRecord:
    async with services.sessions() as session:
        key = await db.find_key_by(session, key_id=key_id)
    if key is None or key.revoked_at is not None:
        raise NotFound("Pick a key that exists and is not revoked.", param="key_id")
    return db.key_record(key)
