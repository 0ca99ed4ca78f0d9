"""A fake Gemini API (generativelanguage.googleapis.com/v1beta), written from Google's public docs: the
image-generation guide, the generateContent reference and the types of the `google-genai` client.

`POST /v1beta/models/{model}:generateContent` (or /v1/) with the key in `x-goog-api-key` (or `?key=`). The body's
`contents[].parts[]` are `text` and `inlineData {mimeType, data}`; `generationConfig.responseModalities`
(the image models answer with an image whether or not it names IMAGE) and `imageConfig {aspectRatio,
imageSize}`. The answer's first candidate carries the image
as an `inlineData` part, with `finishReason` and `usageMetadata` (token counts by modality). A refused
prompt is a 200 with `promptFeedback.blockReason`; a stopped image a candidate without content and a
`finishReason`. Errors are `{"error": {"code", "message", "status"}}`; a bad key is a 400 whose details
carry the reason API_KEY_INVALID.
"""

import base64
import io
import itertools
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes import decode_image

MODELS = (
    "gemini-2.5-flash-image",
    "gemini-3.1-flash-image",
    "gemini-3.1-flash-image-preview",
    "gemini-3-pro-image",
    "gemini-3-pro-image-preview",
)
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "9:16", "16:9", "21:9")
SIZES = {"1K": 1024, "2K": 2048, "4K": 4096}
STATUSES = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED"}
STATUSES |= {500: "INTERNAL", 503: "UNAVAILABLE"}
VERSIONS = ("v1beta", "v1")
IMAGE_INPUT_TOKENS = 258  # what the Gemini API counts an input image of up to 384 px a side as


class FakeGoogle:
    def __init__(self, api_key: str = "test-key") -> None:
        self.api_key = api_key
        self.requests: list[tuple[str, dict[str, Any]]] = []  # (model, body) of every generateContent
        self.headers: list[dict[str, str]] = []
        # Fault knobs, off by default.
        self.fail_status: int | None = None  # answer every call with this status
        self.block_reason: str | None = None  # promptFeedback.blockReason
        self.finish_reason: str | None = None  # a candidate stopped for this reason, with no content
        self.text_only = False  # the model answers with words instead of an image
        self._colors = itertools.count()
        # Google serves both API versions; our adapter uses v1beta, google-genai 3.x defaults to v1.
        routes = [Route(f"/{v}/models/{{model}}:generateContent", self.generate, methods=["POST"]) for v in VERSIONS]
        self.app = Starlette(routes=routes)

    async def generate(self, request: Request) -> Response:
        if self.api_key not in (request.headers.get("x-goog-api-key"), request.query_params.get("key")):
            return error(400, "API key not valid. Please pass a valid API key.", "API_KEY_INVALID")
        model, body = request.path_params["model"], await request.json()
        self.requests.append((model, body))
        self.headers.append(dict(request.headers))
        if self.fail_status is not None:
            return error(self.fail_status, f"fake failure {self.fail_status}")
        if model not in MODELS:
            return error(
                404, f"models/{model} is not found for API version v1beta, or is not supported for generateContent."
            )
        if problem := invalid(body):
            return error(400, problem)
        if self.block_reason:
            usage = {"promptTokenCount": 12, "totalTokenCount": 12}
            return JSONResponse({"promptFeedback": {"blockReason": self.block_reason}, "usageMetadata": usage})
        return JSONResponse(self.answer(model, body))

    def answer(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        config = body.get("generationConfig", {}).get("imageConfig", {})
        tier = config.get("imageSize", "1K")
        width, height = dimensions(config.get("aspectRatio", "1:1"), SIZES[tier])
        if self.finish_reason:
            candidate: dict[str, Any] = {"finishReason": self.finish_reason, "index": 0}
        elif self.text_only:
            text = {"text": "I can't make that image."}
            candidate = {"content": {"role": "model", "parts": [text]}, "finishReason": "STOP", "index": 0}
        else:
            image = {"inlineData": {"mimeType": "image/png", "data": self.image(width, height)}}
            candidate = {"content": {"role": "model", "parts": [image]}, "finishReason": "STOP", "index": 0}
        parts = body["contents"][0]["parts"]
        text = sum(len(part.get("text", "")) // 4 + 1 for part in parts if "text" in part)
        images = IMAGE_INPUT_TOKENS * sum(1 for part in parts if "inlineData" in part)
        out = 0 if self.finish_reason else 1290 if model.startswith("gemini-2.5") else 2000 if tier == "4K" else 1120
        thoughts = 0 if model.startswith("gemini-2.5") else 200
        usage: dict[str, Any] = {
            "promptTokenCount": text + images,
            "candidatesTokenCount": out,
            "totalTokenCount": text + images + out + thoughts,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": text}]
            + ([{"modality": "IMAGE", "tokenCount": images}] if images else []),
            "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": out}],
        }
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model, "responseId": "fake"}

    def image(self, width: int, height: int) -> str:
        shade = next(self._colors) * 37 % 256  # a new colour per image, so tests can tell images apart
        out = io.BytesIO()
        Image.new("RGB", (width, height), (shade, 255 - shade, 64)).save(out, "PNG")
        return base64.b64encode(out.getvalue()).decode()


def dimensions(ratio: str, side: int) -> tuple[int, int]:
    """About side x side pixels at `ratio`, on a grid of 16 (as Google's tables are: 1:1 1K is 1024x1024)."""
    w, h = (int(x) for x in ratio.split(":"))
    scale = (side * side / (w * h)) ** 0.5
    return round(w * scale / 16) * 16, round(h * scale / 16) * 16


def invalid(body: dict[str, Any]) -> str | None:
    """What the Gemini API would refuse in an image generation body, per its reference."""
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents or not isinstance(contents[0].get("parts"), list):
        return "* GenerateContentRequest.contents: contents is not specified"
    for part in contents[0]["parts"]:
        inline = part.get("inlineData")
        if inline is not None and inline_image(inline) is None:
            return "Unable to process input image. Please retry or report in https://developers.generativeai.google/guide/troubleshooting"
        if inline is None and not isinstance(part.get("text"), str):
            return "* GenerateContentRequest.contents[0].parts: a part must have text or inlineData"
    image = body.get("generationConfig", {}).get("imageConfig", {})
    if image.get("aspectRatio", "1:1") not in ASPECT_RATIOS:
        return f"Unsupported aspect ratio: {image.get('aspectRatio')}"
    if image.get("imageSize", "1K") not in SIZES:
        return f"Unsupported image size: {image.get('imageSize')}"
    return None


def inline_image(inline: dict[str, Any]) -> tuple[str, Image.Image] | None:
    """An `inlineData` part's MIME type and image. The API reads JSON by proto3's rules, as Google's own
    client writes it: a field by its JSON or its proto name (`mimeType` or `mime_type`), bytes in standard
    or URL-safe base64."""
    mime = str(inline.get("mimeType", inline.get("mime_type", "")))
    data = str(inline.get("data", "")).replace("-", "+").replace("_", "/")
    image = decode_image(data + "=" * (-len(data) % 4))
    return (mime, image) if mime.startswith("image/") and image is not None else None


def error(code: int, message: str, reason: str | None = None) -> JSONResponse:
    status = STATUSES.get(code, "UNKNOWN")
    details = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason}] if reason else []
    return JSONResponse({"error": {"code": code, "message": message, "status": status, "details": details}}, code)
