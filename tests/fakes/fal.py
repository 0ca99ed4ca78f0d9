"""A fake fal.ai queue (queue.fal.run), written from fal's public queue docs and model schemas.

Submit with `POST /{model}` and `Authorization: Key <key>`; poll the returned `status_url` (202 while
IN_QUEUE or IN_PROGRESS, 200 once COMPLETED); `GET response_url` for the model's output (or its error);
`PUT cancel_url` to take a queued request back. Like fal's, the queue URLs name only `owner/app`: the status
of a `fal-ai/flux/schnell` request is at `/fal-ai/flux/requests/{id}/status`. Image URLs point at `/files/`.
All URLs are built from the incoming request, so they point at wherever `serve()` put the app.

Faults are injected by setting attributes on the instance; everything it saw is recorded for asserts.
"""

import asyncio
import base64
import io
import uuid
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from tests.fakes import decode_data_uri
from tests.fakes.bfl import ULTRA_SIZES
from tests.fakes.callbacks import CallingBack

PRO = "fal-ai/flux-pro/v1.1"
ULTRA = "fal-ai/flux-pro/v1.1-ultra"
SCHNELL = "fal-ai/flux/schnell"
KONTEXT = ("fal-ai/flux-pro/kontext", "fal-ai/flux-pro/kontext/max")
FILL = "fal-ai/flux-pro/v1/fill"
BASE_FIELDS = {"prompt", "seed", "num_images", "output_format", "sync_mode"}
COMMON_FIELDS = BASE_FIELDS | {"enable_safety_checker"}
KONTEXT_FIELDS = BASE_FIELDS | {"aspect_ratio", "safety_tolerance", "enhance_prompt", "guidance_scale"}
# Real fal ignores fields a model does not take; the fake refuses them, so that a misdirected one shows.
FIELDS = {
    PRO: COMMON_FIELDS | {"image_size", "safety_tolerance", "enhance_prompt"},
    ULTRA: COMMON_FIELDS | {"aspect_ratio", "safety_tolerance", "enhance_prompt", "raw", "image_url"},
    SCHNELL: COMMON_FIELDS | {"image_size", "num_inference_steps", "acceleration", "guidance_scale"},
    FILL: BASE_FIELDS | {"image_url", "mask_url", "safety_tolerance", "enhance_prompt"},
}
for app in KONTEXT:  # one way in per number of input images
    FIELDS |= {app: KONTEXT_FIELDS | {"image_url"}, f"{app}/multi": KONTEXT_FIELDS | {"image_urls"}}
    FIELDS[f"{app}/text-to-image"] = KONTEXT_FIELDS
# FLUX.2 (fal's model pages): one image a request (no num_images), image_size, safety_tolerance "1"-"5";
# each has an `/edit` app that takes `image_urls`; flex takes guidance_scale and num_inference_steps.
FLUX2 = ("fal-ai/flux-2-pro", "fal-ai/flux-2-max", "fal-ai/flux-2-flex")
FLUX2_FIELDS = {"prompt", "seed", "output_format", "sync_mode", "image_size", "safety_tolerance"}
FLUX2_FIELDS |= {"enable_safety_checker"}
for app in FLUX2:
    tuning = {"guidance_scale", "num_inference_steps"} if app.endswith("flex") else set()
    FIELDS |= {app: FLUX2_FIELDS | tuning, f"{app}/edit": FLUX2_FIELDS | tuning | {"image_urls"}}
REQUIRED_IMAGES = {"image_url": (FILL, *KONTEXT), "image_urls": tuple(f"{app}/multi" for app in KONTEXT)}
REQUIRED_IMAGES["image_urls"] += tuple(f"{app}/edit" for app in FLUX2)
REQUIRED_IMAGES["mask_url"] = (FILL,)
# Seedream (fal's model pages): `/text-to-image` and `/edit` (which needs `image_urls`, up to 10) per version;
# image_size, num_images 1-6 and max_images 1-6, enable_safety_checker, enhance_prompt_mode; JPEG or PNG out.
SEEDREAM = ("fal-ai/bytedance/seedream/v4", "fal-ai/bytedance/seedream/v4.5")
SEEDREAM_FIELDS = {"prompt", "seed", "sync_mode", "image_size", "num_images", "max_images", "enable_safety_checker"}
SEEDREAM_FIELDS |= {"enhance_prompt_mode"}
for app in SEEDREAM:
    FIELDS |= {f"{app}/text-to-image": SEEDREAM_FIELDS, f"{app}/edit": SEEDREAM_FIELDS | {"image_urls"}}
REQUIRED_IMAGES["image_urls"] += tuple(f"{app}/edit" for app in SEEDREAM)
PRESETS = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}
FORMATS = {"jpeg": "JPEG", "png": "PNG"}
ERROR_DETAILS = {
    401: "No user found for Key ID and Secret",
    403: "User is locked. Reason: Exhausted balance. Top up your balance at fal.ai/dashboard/billing.",
    429: "Too many requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
MODERATED = {
    "loc": ["body", "prompt"],
    "msg": "The content could not be processed because it contained material flagged by a content checker.",
    "type": "content_policy_violation",
}


@dataclass
class Queued:
    id: str
    model: str
    app: str  # owner/app: what the queue URLs name
    body: dict[str, Any]
    size: tuple[int, int]
    format: str  # a Pillow format name
    polls: int = 0
    completed: bool = False
    cancelled: bool = False
    output: dict[str, Any] | None = None  # made on the first result fetch
    webhook: str | None = None  # `fal_webhook`: then it completes on a timer (`CallingBack`), not by polls


@dataclass
class FakeFal(CallingBack):
    key: str = "test-key"
    base_url: str = ""  # for tests' convenience once served; the fake itself reads the request's
    # Each request answers queued_polls IN_QUEUE, then running_polls IN_PROGRESS, then COMPLETED.
    queued_polls: int = 1
    running_polls: int = 1
    submit_status: int | None = None  # answer every submit with this HTTP status and a `detail`
    submit_delay: float = 0.0  # seconds before a submit is answered
    submit_garbage: bool = False  # answer submits with an HTML page (a proxy error, say)
    submit_response: dict[str, Any] | None = None  # replace the submit response body
    moderate_on_submit: bool = False  # 422 content_policy_violation
    status_url_override: str | None = None
    cancel_url_override: str | None = None
    status_garbage: bool = False
    poll_status: int | None = None  # answer every status poll with this HTTP status
    completed_with_error: str | None = None  # COMPLETED, with this `error` (the model failed)
    result_error: int | None = None  # response_url answers this: 422 is content_policy_violation
    nsfw: list[bool] | None = None  # has_nsfw_concepts for each request's images, by index
    data_uris: bool = False  # answer images inline, as sync_mode does
    image_url_override: str | None = None
    image_format: str | None = None  # force a Pillow format; None honours the request's output_format
    download_status: int = 200
    cancel_delay: float = 0.0  # seconds a cancel takes to answer
    # What the fake saw.
    submissions: list[dict[str, Any]] = field(default_factory=list)
    models: list[str] = field(default_factory=list)  # the model of each submission
    requests: list[Queued] = field(default_factory=list)
    polls: list[str] = field(default_factory=list)  # request ids, one per status poll
    results: list[str] = field(default_factory=list)  # request ids, one per response_url fetch
    cancels: list[str] = field(default_factory=list)  # request ids, one per PUT cancel_url
    downloads: list[str] = field(default_factory=list)  # paths
    authorizations: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, header
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # name: data, media type
    in_flight: int = 0  # requests submitted and neither collected nor cancelled
    peak: int = 0

    def __post_init__(self) -> None:
        self.app = Starlette(
            routes=[
                Route("/files/{name}", self.file, methods=["GET"]),
                Route("/{owner}/{app}/requests/{id}/status", self.status, methods=["GET"]),
                Route("/{owner}/{app}/requests/{id}/cancel", self.cancel, methods=["PUT"]),
                Route("/{owner}/{app}/requests/{id}", self.result, methods=["GET"]),
                Route("/{model:path}", self.submit, methods=["POST"]),
            ]
        )

    def saw(self, request: Request) -> bool:
        """Record the request's credential; True when it is ours."""
        authorization = request.headers.get("authorization")
        self.authorizations.append((request.method, request.url.path, authorization))
        return authorization == f"Key {self.key}"

    def find(self, request: Request) -> Queued | None:
        app = f"{request.path_params['owner']}/{request.path_params['app']}"
        found = (queued for queued in self.requests if queued.id == request.path_params["id"])
        return next((queued for queued in found if queued.app == app), None)

    async def submit(self, request: Request) -> Response:
        model = request.path_params["model"]
        if not self.saw(request):
            return JSONResponse({"detail": ERROR_DETAILS[401]}, 401)
        if model not in FIELDS:
            return JSONResponse({"detail": f"Application {model!r} not found"}, 404)
        body = await request.json()
        self.submissions.append(body)
        self.models.append(model)
        await asyncio.sleep(self.submit_delay)
        if self.submit_status is not None:
            return JSONResponse({"detail": ERROR_DETAILS.get(self.submit_status, "error")}, self.submit_status)
        if self.submit_garbage:
            return HTMLResponse("<html><body><h1>502 Bad Gateway</h1></body></html>")
        if problems := validate(model, body):
            return JSONResponse({"detail": problems}, 422)
        if self.moderate_on_submit:
            return JSONResponse({"detail": [MODERATED]}, 422)
        app = "/".join(model.split("/")[:2])
        image_format = self.image_format or FORMATS[body.get("output_format", "jpeg")]
        queued = Queued(uuid.uuid4().hex, model, app, body, output_size(model, body), image_format)
        self.requests.append(queued)
        if webhook := request.query_params.get("fal_webhook"):
            queued.webhook = webhook
            self.later(lambda: self.complete(request, queued), webhook)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        if self.submit_response is not None:
            return JSONResponse(self.submit_response)
        base = f"{str(request.base_url).rstrip('/')}/{app}/requests/{queued.id}"
        return JSONResponse(
            {
                "request_id": queued.id,
                "status": "IN_QUEUE",
                "response_url": base,
                "status_url": self.status_url_override or f"{base}/status",
                "cancel_url": self.cancel_url_override or f"{base}/cancel",
                "queue_position": len(self.requests) - 1,
            }
        )

    async def status(self, request: Request) -> Response:
        self.polls.append(request.path_params["id"])
        if not self.saw(request):
            return JSONResponse({"detail": ERROR_DETAILS[401]}, 401)
        if self.status_garbage:
            return HTMLResponse("<html><body><h1>502 Bad Gateway</h1></body></html>")
        if self.poll_status is not None:
            return JSONResponse({"detail": ERROR_DETAILS.get(self.poll_status, "error")}, self.poll_status)
        queued = self.find(request)
        if queued is None:
            return JSONResponse({"detail": "Request not found"}, 404)
        queued.polls += 1
        response_url = str(request.url).removesuffix("/status")
        by_polls = not queued.webhook and not queued.cancelled  # else it ends on a timer, or has been cancelled
        if by_polls and queued.polls <= self.queued_polls:
            return JSONResponse({"status": "IN_QUEUE", "queue_position": 0, "response_url": response_url}, 202)
        running = queued.polls <= self.queued_polls + self.running_polls if by_polls else not queued.completed
        if running and not queued.cancelled:
            return JSONResponse({"status": "IN_PROGRESS", "logs": [], "response_url": response_url}, 202)
        queued.completed = True
        answer: dict[str, Any] = {"status": "COMPLETED", "response_url": response_url, "logs": None}
        answer["metrics"] = {"inference_time": 1.25}
        if queued.cancelled:
            answer |= {"error": "Request was cancelled", "error_type": "request_cancelled"}
        elif self.completed_with_error:
            answer |= {"error": self.completed_with_error, "error_type": "runner_disconnected"}
        return JSONResponse(answer)

    async def result(self, request: Request) -> Response:
        self.results.append(request.path_params["id"])
        if not self.saw(request):
            return JSONResponse({"detail": ERROR_DETAILS[401]}, 401)
        queued = self.find(request)
        if queued is None:
            return JSONResponse({"detail": "Request not found"}, 404)
        if not queued.completed:
            return JSONResponse({"detail": "Request is still in progress"}, 400)
        if queued.output is None:  # collected: no longer in flight
            self.in_flight -= 1
        if self.result_error == 422:
            return JSONResponse({"detail": [MODERATED]}, 422)
        if self.result_error is not None:
            return JSONResponse({"detail": ERROR_DETAILS.get(self.result_error, "error")}, self.result_error)
        if self.completed_with_error:  # the response URL repeats the model's own error
            return JSONResponse({"detail": self.completed_with_error}, 500)
        if queued.output is None:
            queued.output = self.output(request, queued)
        return JSONResponse(queued.output)

    def complete(self, request: Request, queued: Queued) -> dict[str, Any]:
        """Complete a request submitted with `fal_webhook`; what fal POSTs to it."""
        queued.completed = True
        answer = {"request_id": queued.id, "gateway_request_id": queued.id, "status": "OK", "error": None}
        if self.completed_with_error:
            return answer | {"status": "ERROR", "error": self.completed_with_error, "payload": None}
        return answer | {"payload": self.output(request, queued)}

    def output(self, request: Request, queued: Queued) -> dict[str, Any]:
        """The model's answer: its images (black where the safety checker flagged them), published."""
        count = queued.body.get("num_images", 1)
        flags = [bool(self.nsfw and i < len(self.nsfw) and self.nsfw[i]) for i in range(count)]
        width, height = queued.size
        media_type = f"image/{queued.format.lower()}"
        images = []
        for i, flagged in enumerate(flags):
            colour = (0, 0, 0) if flagged else ((i * 60) % 256, 90, 160)
            out = io.BytesIO()
            Image.new("RGB", queued.size, colour).save(out, queued.format)
            if self.data_uris or queued.body.get("sync_mode"):
                url = f"data:{media_type};base64,{base64.b64encode(out.getvalue()).decode()}"
            else:
                name = f"{queued.id}-{i}.{queued.format.lower()}"
                self.files[name] = (out.getvalue(), media_type)
                url = self.image_url_override or f"{str(request.base_url).rstrip('/')}/files/{name}"
            images.append({"url": url, "width": width, "height": height, "content_type": media_type})
        seed = queued.body.get("seed", 1234)
        prompt = queued.body.get("prompt")
        timings = {"inference": 1.2}
        return {"images": images, "timings": timings, "seed": seed, "has_nsfw_concepts": flags, "prompt": prompt}

    async def cancel(self, request: Request) -> Response:
        self.cancels.append(request.path_params["id"])
        await asyncio.sleep(self.cancel_delay)
        if not self.saw(request):
            return JSONResponse({"detail": ERROR_DETAILS[401]}, 401)
        queued = self.find(request)
        if queued is None:
            return JSONResponse({"status": "NOT_FOUND"}, 404)
        if queued.completed:
            return JSONResponse({"status": "ALREADY_COMPLETED"}, 400)
        if not queued.cancelled:
            queued.cancelled = True
            self.in_flight -= 1
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, 202)

    async def file(self, request: Request) -> Response:
        self.saw(request)
        self.downloads.append(request.url.path)
        found = self.files.get(request.path_params["name"])
        if self.download_status != 200 or found is None:
            status = self.download_status if self.download_status != 200 else 404
            return Response(b"<Error><Code>NoSuchKey</Code></Error>", status, media_type="application/xml")
        return Response(found[0], media_type=found[1])


def validate(model: str, body: Any) -> list[dict[str, Any]]:
    """FastAPI-style validation errors (fal's 422 `detail`) for the fields we check."""
    if not isinstance(body, dict):
        return [{"loc": ["body"], "msg": "Input should be a valid dictionary", "type": "dict_type"}]
    problems = [
        problem(name, "Extra inputs are not permitted", "extra_forbidden") for name in body if name not in FIELDS[model]
    ]
    if not isinstance(body.get("prompt"), str) or not body["prompt"]:
        problems.append(problem("prompt", "Field required", "missing"))
    count = body.get("num_images", 1)
    if not isinstance(count, int) or not 1 <= count <= 4:
        problems.append(problem("num_images", "Input should be between 1 and 4", "less_than_equal"))
    if "image_size" in body and not valid_size(body["image_size"]):
        problems.append(problem("image_size", "Input should be a valid ImageSize or preset", "union_tag_invalid"))
    if body.get("aspect_ratio", "16:9") not in ULTRA_SIZES:
        problems.append(problem("aspect_ratio", f"Input should be one of {', '.join(ULTRA_SIZES)}", "enum"))
    if body.get("output_format", "jpeg") not in FORMATS:
        problems.append(problem("output_format", "Input should be 'jpeg' or 'png'", "enum"))
    tolerances = ("1", "2", "3", "4", "5") if model.startswith(FLUX2) else ("1", "2", "3", "4", "5", "6")
    if body.get("safety_tolerance", "2") not in tolerances:
        problems.append(problem("safety_tolerance", f"Input should be one of {', '.join(tolerances)}", "enum"))
    most = 50 if model.startswith(FLUX2) else 12
    steps = body.get("num_inference_steps", 4)
    if not isinstance(steps, int) or not 1 <= steps <= most:
        problems.append(problem("num_inference_steps", f"Input should be between 1 and {most}", "less_than_equal"))
    if not 1.5 <= body.get("guidance_scale", 3.5) <= (10 if model.startswith(FLUX2) else 20):
        problems.append(problem("guidance_scale", "Input should be in range", "less_than_equal"))
    if not isinstance(body.get("seed", 0), int):
        problems.append(problem("seed", "Input should be a valid integer", "int_type"))
    if not isinstance(body.get("enable_safety_checker", True), bool):
        problems.append(problem("enable_safety_checker", "Input should be a valid boolean", "bool_type"))
    return problems + image_problems(model, body)


def image_problems(model: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Input images are URLs; the fake reaches none but data URIs, and requires those its model needs."""
    problems = []
    for name, models in REQUIRED_IMAGES.items():
        if model in models and name not in body:
            problems.append(problem(name, "Field required", "missing"))
    uris = [body.get(name) for name in ("image_url", "mask_url") if name in body] + list(body.get("image_urls", []))
    if any(decode_data_uri(uri) is None for uri in uris):
        problems.append(problem("image_url", "Failed to download the file", "file_download_error"))
    return problems


def problem(name: str, msg: str, kind: str) -> dict[str, Any]:
    return {"loc": ["body", name], "msg": msg, "type": kind}


def valid_size(size: Any) -> bool:
    if isinstance(size, str):
        return size in PRESETS
    if not isinstance(size, dict) or set(size) != {"width", "height"}:
        return False
    return all(isinstance(side, int) and 64 <= side <= 14142 for side in size.values())


def output_size(model: str, body: dict[str, Any]) -> tuple[int, int]:
    """Ultra renders ~4 MP for its aspect ratio, Kontext ~1 MP for its (default: the first input's, or
    1:1), Fill its image's size; the others render image_size (default landscape_4_3)."""
    if model == ULTRA:
        return ULTRA_SIZES[body.get("aspect_ratio", "16:9")]
    if model == FILL:
        return decode_data_uri(body["image_url"]).size  # type: ignore[union-attr]  # validated
    if model.startswith(KONTEXT[0]):
        first = decode_data_uri(body.get("image_url") or (body.get("image_urls") or [None])[0])
        w, h = (int(part) for part in body["aspect_ratio"].split(":")) if "aspect_ratio" in body else (1, 1)
        ratio = w / h if "aspect_ratio" in body or first is None else first.width / first.height
        width = round((1_048_576 * ratio) ** 0.5 / 16) * 16
        return width, round(width / ratio / 16) * 16
    size = body.get("image_size", "landscape_4_3")
    return PRESETS[size] if isinstance(size, str) else (size["width"], size["height"])
