"""A fake OpenAI Images API serving dall-e-3, written from OpenAI's public API reference.

`POST /v1/images/generations` with `Authorization: Bearer <key>`; dall-e-3 takes only `n=1` and the
sizes 1024x1024, 1792x1024, 1024x1792; answers `{"created", "data": [{"b64_json"|"url", "revised_prompt"}]}`
and errors as `{"error": {"message", "type", "param", "code"}}`. Result URLs are served under `/files/`.
"""

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tests.fakes import ImagesFake

SIZES = ("1024x1024", "1792x1024", "1024x1792")
SAFETY_MESSAGE = (
    "Your request was rejected as a result of our safety system. "
    "Your prompt may contain text that is not allowed by our safety system."
)


class FakeOpenAI(ImagesFake):
    def __init__(self, api_key: str = "test-key") -> None:
        super().__init__(api_key)
        self.moderate: str | None = None  # error code for a 400 safety refusal, e.g. content_policy_violation
        self.retired = False  # 404 model_not_found, as OpenAI has answered for dall-e-3 since 2026-05-12
        self.out_of_credit = False  # 429 insufficient_quota
        self.image_format = "PNG"  # the Pillow format images are encoded in
        self.empty = False  # answer 200 with no images

    def unauthorized(self) -> Response:
        return error(401, "Incorrect API key provided: test-***.", "invalid_api_key")

    def answer(self, request: Request, body: dict[str, Any]) -> Response:
        if refusal := self.refusal(body):
            return refusal
        if problem := invalid(body):
            return error(400, *problem)
        if self.moderate:
            return error(400, SAFETY_MESSAGE, self.moderate)
        width, height = (int(side) for side in body.get("size", "1024x1024").split("x"))
        data = [] if self.empty else [self.image(width, height, self.image_format)]
        revised = f"A {body.get('style', 'vivid')} picture of {body['prompt']}"
        if body.get("response_format", "url") == "url" or self.return_urls:
            entries = [{"url": self.publish(request, item), "revised_prompt": revised} for item in data]
        else:
            entries = [{"b64_json": self.encode(item), "revised_prompt": revised} for item in data]
        return JSONResponse({"created": int(time.time()), "data": entries})

    def refusal(self, body: dict[str, Any]) -> Response | None:
        if self.fail_status is not None:
            return error(self.fail_status, f"fake failure {self.fail_status}", None, "server_error")
        if self.retired or body.get("model") != "dall-e-3":
            model = body.get("model")
            return error(404, f"The model `{model}` does not exist or you do not have access to it.", "model_not_found")
        if self.out_of_credit:
            message = "You exceeded your current quota, please check your plan and billing details."
            return error(429, message, "insufficient_quota", "insufficient_quota")
        return None


def invalid(body: dict[str, Any]) -> tuple[str, str] | None:
    """(message, code) for what OpenAI rejects in a dall-e-3 request."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt or len(prompt) > 4000:
        return "Invalid 'prompt': must be a string of 1 to 4000 characters.", "invalid_value"
    if body.get("n", 1) != 1:
        return "You must provide n=1 for this model.", "invalid_value"
    if body.get("size", "1024x1024") not in SIZES:
        return "The size is not supported by this model.", "invalid_size"
    for field, allowed in (("quality", ("standard", "hd")), ("style", ("vivid", "natural"))):
        if body.get(field, allowed[0]) not in allowed:
            return f"Invalid value: '{body[field]}'. Supported values are: {allowed}.", "invalid_value"
    if body.get("response_format", "url") not in ("url", "b64_json"):
        return "Invalid value for response_format.", "invalid_value"
    return None


def error(status: int, message: str, code: str | None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status)
