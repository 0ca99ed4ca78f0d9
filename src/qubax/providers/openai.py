"""Any OpenAI-compatible Images API: dall-e-3 (one synchronous call per image) and the GPT image models
(one call for all `n`, billed by the token count the answer carries)."""

import contextlib
from collections.abc import Callable
from datetime import date
from typing import Any, TypeGuard

import aiohttp
from pydantic import ValidationError

from qubax.errors import MODEL_NOT_SERVED, ContentPolicyViolation, TaskFailed, UpstreamError
from qubax.protocol import Usage
from qubax.providers import GeneratedImage, ProviderInfo, Tokens, aspect_ratio
from qubax.providers.adapter import Adapter
from qubax.providers.batches import fan_out, whole_batch
from qubax.providers.deliveries import decode_b64
from qubax.providers.failures import DETAIL_CHARS, billed, error_detail
from qubax.providers.hosts import base_host
from qubax.providers.replies import Reply
from qubax.routing.request import ImageRequest, PartialImage

NAME, PROVIDER = "openai", "OpenAI"
# Where OpenAI served dall-e-3 result URLs from; the configured base host (a proxy, a fake) is trusted too.
DELIVERY_HOSTS = ("oaidalleapiprodscus.blob.core.windows.net",)
MODERATION_CODES = ("content_policy_violation", "moderation_blocked")
GPT_IMAGE = ("gpt-image", "chatgpt-image")  # the names of OpenAI's token-billed image models start so
GPT_SIZES = {"1:1": "1024x1024", "3:2": "1536x1024", "2:3": "1024x1536"}  # by aspect ratio
DALL_E_QUALITIES = {"standard": "medium", "hd": "high"}
NO_CREDIT_CODES = ("insufficient_quota", "billing_hard_limit_reached")


class OpenAI(Adapter):
    name, label = NAME, PROVIDER

    async def generate(self, request: ImageRequest, model: str) -> list[GeneratedImage]:
        if request.images or model.startswith(GPT_IMAGE):
            payload = gpt_body(request, model)
            # The upstream's partial images are relayed from a call for one image: events carry no image index.
            if request.partials is not None and request.partial_images and request.n == 1:
                payload |= {"stream": True, "partial_images": request.partial_images}
            return await self._call(model, payload, request)
        # dall-e-3 takes only n=1: one call per image, all at once.
        return await fan_out(self._call(model, body(request, model), request) for _ in range(request.n))

    async def _call(self, model: str, payload: dict[str, Any], request: ImageRequest) -> list[GeneratedImage]:
        """One upstream call for `payload["n"]` images: a generation, or an edit of the request's images
        (multipart); streamed when the payload asks for partial images."""
        url = f"{self.upstream.base_url}/images/{'edits' if request.images else 'generations'}"
        data: dict[str, Any] = {"form": edit_form(request, payload)} if request.images else {"json": payload}
        events = relay(request) if payload.get("stream") else None
        async with self.upstream.lease() as key:
            headers = {"authorization": f"Bearer {key}"}
            response = await self.send("POST", url, headers=headers, events=events, **data)
        self._raise_for_error(response, model)
        answer = self.checked_json(response)
        if events is not None:
            answer = completed(answer)
        n = payload["n"]
        items = answer.get("data")
        items = [item for item in items if isinstance(item, dict)][:n] if isinstance(items, list) else []
        if not items:
            raise TaskFailed(f"{PROVIDER} returned no image.")
        settings = {name: answer[name] for name in ("quality", "background") if isinstance(answer.get(name), str)}
        usage = read_usage(answer.get("usage"))
        tokens = Tokens(model, usage) if usage else None  # the call's, counted once: on its first image
        with billed():
            images = [await self._image(item, settings, tokens if i == 0 else None) for i, item in enumerate(items)]
        return whole_batch(images, n, PROVIDER)

    async def _image(self, item: dict[str, Any], settings: dict[str, str], tokens: Tokens | None) -> GeneratedImage:
        revised = item.get("revised_prompt")
        fields: dict[str, Any] = {"revised_prompt": revised if isinstance(revised, str) else None}
        fields |= {"tokens": tokens, "settings": settings}
        if item.get("b64_json") is not None:
            return self.inline_image(item["b64_json"], **fields)
        # Only reached when the host ignores response_format=b64_json; download() refuses foreign hosts.
        return GeneratedImage(await self.download(item.get("url")), **fields)

    async def shutdown_dates(self) -> dict[str, date]:
        """The shutdown dates OpenAI publishes for its models: `GET /models` carries an optional
        `shutdown_date` (YYYY-MM-DD, or null when none is announced) per model. Read by
        `background.lifecycle`, never on a request's path; a date it cannot read is left out."""
        async with self.upstream.lease() as key:
            headers = {"authorization": f"Bearer {key}"}
            response = await self.send("GET", f"{self.upstream.base_url}/models", headers=headers)
        listed = self.checked_json(response).get("data")
        dates = {}
        for model in listed if isinstance(listed, list) else []:
            if isinstance(model, dict) and isinstance(model.get("id"), str) and model.get("shutdown_date"):
                with contextlib.suppress(TypeError, ValueError):
                    dates[model["id"]] = date.fromisoformat(model["shutdown_date"])
        return dates

    def _raise_for_error(self, response: Reply, model: str) -> None:
        """OpenAI's quirks (its error `code` says more than the status); `checked_json` maps the rest."""
        if response.status_code < 300:
            return
        code, detail = error_code(response), error_detail(response)
        # Until 2023 OpenAI sent the safety-system message with `code: null`.
        if code in MODERATION_CODES or (response.status_code == 400 and "safety system" in detail.lower()):
            raise ContentPolicyViolation()
        if response.status_code == 404 or code == "model_not_found":
            # OpenAI shut dall-e-3 down on 2026-05-12; only compatible hosts still serve it.
            # Nothing was made: the next route (another host, or another model: the catalog's) may serve.
            host = base_host(self.upstream.base_url)
            error = UpstreamError(
                f"The upstream for this model does not serve {model}.",
                detail=f"the configured OpenAI-compatible host ({host}) does not serve it; point "
                f"QUBAX_OPENAI_BASE_URL at a host that does. It said: {detail or 'not found'}",
                failover=True,
            )
            error.code = MODEL_NOT_SERVED
            raise error
        if code in NO_CREDIT_CODES:
            # OpenAI says "out of credit" with 429, which must not be retried like a rate limit.
            raise UpstreamError(
                f"{PROVIDER} could not serve the request ({response.status_code}).",
                detail=f"the account is out of credit: {detail}",
                failover=True,
            )


def body(request: ImageRequest, model: str) -> dict[str, Any]:
    # b64_json because OpenAI's result URLs expire after an hour and would need a second fetch anyway.
    payload: dict[str, Any] = {
        "model": model,
        "prompt": request.prompt,
        "n": 1,
        "size": f"{request.width}x{request.height}",
        "response_format": "b64_json",
    }
    if request.quality is not None:
        payload["quality"] = request.quality
    if request.style is not None:
        payload["style"] = request.style
    return payload


def gpt_body(request: ImageRequest, model: str) -> dict[str, Any]:
    """A GPT image model's request. No `response_format`: OpenAI refuses it for these models, which
    always answer base64. A request for another model (a catalog route that serves dall-e-3 with a GPT
    image model) is made at the nearest size the model takes, fitted afterwards, with its quality
    translated and its style left out."""
    size = request.size
    if size not in GPT_SIZES.values() and not model.startswith("gpt-image-2"):
        size = GPT_SIZES[aspect_ratio(request.width, request.height, tuple(GPT_SIZES))]
    payload: dict[str, Any] = {
        "model": model,
        "prompt": request.prompt,
        "n": request.n,
        "size": size,
        "output_format": request.output_format,
    }
    optional = {
        "quality": DALL_E_QUALITIES.get(request.quality or "", request.quality),
        "background": request.background,
        "moderation": request.moderation,
        "output_compression": request.output_compression,
    }
    return payload | {name: value for name, value in optional.items() if value is not None}


def edit_form(request: ImageRequest, payload: dict[str, Any]) -> aiohttp.FormData:
    """An edit as OpenAI takes it: the fields as text parts, each image as an `image[]` file part (read
    from where the upload was kept, from its start, on a handle of its own), the mask as `mask`."""
    form = aiohttp.FormData()
    fields = payload | ({"input_fidelity": request.input_fidelity} if request.input_fidelity else {})
    fields.pop("moderation", None)  # not an edit parameter
    for name, value in fields.items():
        form.add_field(name, str(value).lower() if isinstance(value, bool) else str(value))
    uploads = [("image[]", image) for image in request.images] + ([("mask", request.mask)] if request.mask else [])
    for name, image in uploads:
        form.add_field(name, image.reopen(), filename=image.filename, content_type=image.content_type)
    return form


def relay(request: ImageRequest) -> Callable[[Any], None]:
    """What to do with each event of a streamed answer: pass partial images on, raise for an error."""

    def on_event(event: Any) -> None:
        if not isinstance(event, dict):
            return
        if event.get("error") or event.get("type") == "error":
            error = event.get("error")
            said = error.get("message") if isinstance(error, dict) else error
            detail = str(said or "(no message)")[:DETAIL_CHARS]
            raise UpstreamError(f"{PROVIDER} failed while streaming the image.", detail=detail, failover=False)
        image, index, partials = event.get("b64_json"), event.get("partial_image_index"), request.partials
        partial = str(event.get("type")).endswith(".partial_image")
        if partial and isinstance(index, int) and partials is not None and is_base64(image):
            partials.put_nowait(PartialImage(request.index, index, image))

    return on_event


def is_base64(image: Any) -> TypeGuard[str | bytes]:
    """Whether a partial image is base64, as a finished one must be: it is handed on as the upstream sent
    it (bytes, `payload`), into our events as it is. One that is not is left out; the image goes on."""
    try:
        decode_b64(image, PROVIDER)
    except UpstreamError:
        return False
    return True


def completed(event: dict[str, Any]) -> dict[str, Any]:
    """A streamed answer's last event, the finished image, in the shape of an unstreamed answer (which
    a host that does not stream sends instead)."""
    if "type" not in event and "data" in event:
        return event
    if not str(event.get("type")).endswith(".completed"):
        raise TaskFailed(f"{PROVIDER} ended the stream without the finished image.")
    settings = {name: event.get(name) for name in ("usage", "quality", "background")}
    return {"data": [{"b64_json": event.get("b64_json")}], **settings}


def read_usage(found: Any) -> Usage | None:
    """The answer's token count, or None when it has none we can read (then the estimate is billed)."""
    try:
        return Usage.model_validate(found) if found is not None else None
    except ValidationError:
        return None


def error_code(response: Reply) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


# The cap keeps bursts from becoming 429s.
INFO = ProviderInfo(
    name=NAME,
    build=OpenAI,
    credential="OPENAI_API_KEY",
    base_url="https://api.openai.com/v1",
    concurrency=20,
    delivery_hosts=DELIVERY_HOSTS,
)
