"""A fake Black Forest Labs API (api.bfl.ai), written from BFL's public OpenAPI spec and docs.

Submit with `POST /v1/flux-pro-1.1`, `/v1/flux-pro-1.1-ultra`, `/v1/flux-kontext-pro` or `-max` (up to four
base64 `input_image`s) or `/v1/flux-pro-1.0-fill` (a base64 `image` and `mask`), poll the returned `polling_url`
(`GET /v1/get_result?id=`), then download `result.sample` (`/delivery/<id>.<ext>`). URLs are built
from the incoming request, so they point at wherever `serve()` put the app.

Faults are injected by setting attributes on the instance; everything it saw is recorded for asserts.
"""

import asyncio
import io
import uuid
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from tests.fakes import decode_image
from tests.fakes.callbacks import CallingBack

PRO = "flux-pro-1.1"
ULTRA = "flux-pro-1.1-ultra"
KONTEXT_PRO = "flux-kontext-pro"
KONTEXT_MAX = "flux-kontext-max"
FILL = "flux-pro-1.0-fill"
BASE_FIELDS = {"prompt", "prompt_upsampling", "seed", "safety_tolerance", "output_format", "webhook_url"}
BASE_FIELDS |= {"webhook_secret"}
COMMON_FIELDS = BASE_FIELDS | {"image_prompt"}
KONTEXT_INPUTS = ("input_image", "input_image_2", "input_image_3", "input_image_4")
KONTEXT_FIELDS = BASE_FIELDS | {"aspect_ratio", *KONTEXT_INPUTS}
FIELDS = {
    PRO: COMMON_FIELDS | {"width", "height"},
    ULTRA: COMMON_FIELDS | {"aspect_ratio", "raw", "image_prompt_strength"},
    KONTEXT_PRO: KONTEXT_FIELDS,
    KONTEXT_MAX: KONTEXT_FIELDS,
    FILL: BASE_FIELDS | {"image", "mask", "steps", "guidance"},
}
# FLUX.2 (docs.bfl.ai API reference): width and height in multiples of 16 (at least 64, at most 4 MP in
# all), up to 8 input images (klein: 4), safety_tolerance 0-5, jpeg or png; flex adds steps and guidance.
# The answer carries cost (credits), input_mp and output_mp.
FLUX2_INPUTS = ("input_image", *(f"input_image_{i}" for i in range(2, 9)))
FLUX2 = {"flux-2-pro": 8, "flux-2-max": 8, "flux-2-flex": 8, "flux-2-klein-4b": 4, "flux-2-klein-9b": 4}
for name, most in FLUX2.items():
    FIELDS[name] = BASE_FIELDS | {"width", "height", *FLUX2_INPUTS[:most]}
FIELDS["flux-2-flex"] |= {"steps", "guidance"}
MAX_PIXELS = 4 * 1024 * 1024
COST = {PRO: 4, ULTRA: 6, KONTEXT_PRO: 4, KONTEXT_MAX: 8, FILL: 5}  # credits; 1 credit = $0.01
# Observed output sizes of FLUX1.1 [pro] Ultra (~4 MP) per aspect ratio.
ULTRA_SIZES = {
    "21:9": (3136, 1344),
    "16:9": (2752, 1536),
    "3:2": (2496, 1664),
    "4:3": (2368, 1792),
    "1:1": (2048, 2048),
    "3:4": (1792, 2368),
    "2:3": (1664, 2496),
    "9:16": (1536, 2752),
    "9:21": (1344, 3136),
}
FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
ENDED = 1_000_000  # a poll past every status sequence: where a task stands once it has ended
ERROR_DETAILS = {
    401: "Not authenticated",
    402: "Insufficient credits",
    403: "Forbidden",
    429: "You have exceeded the number of active tasks",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass
class Task:
    id: str
    model: str
    body: dict[str, Any]
    size: tuple[int, int]
    format: str  # a Pillow format name
    polls: int = 0
    ended: bool = False  # a task with a webhook_url ends on a timer (`CallingBack`), not by being polled


@dataclass
class FakeBFL(CallingBack):
    key: str = "test-key"
    base_url: str = ""  # for tests' convenience once served; the fake itself reads the request's
    # Statuses each task answers, one per poll; the last one repeats. Default: pending_polls Pendings,
    # then `moderate` (if set) or Ready. `statuses_for[i]` overrides this for the i-th submitted task.
    pending_polls: int = 1
    moderate: str | None = None
    status_sequence: list[str] | None = None
    statuses_for: dict[int, list[str]] = field(default_factory=dict)
    error_details: dict[str, Any] | None = None  # `details` sent with status Error
    submit_status: int | None = None  # answer every submit with this HTTP status and a `detail`
    submit_delay: float = 0.0  # seconds before a submit is answered
    submit_response: dict[str, Any] | None = None  # replace the submit response body
    submit_html: bool = False  # answer submits with an HTML page (status: submit_status or 200)
    polling_url_override: str | None = None
    poll_status: int | None = None  # answer every poll with this HTTP status
    poll_garbage: bool = False  # answer polls with an HTML page (a proxy error, say)
    sample_url_override: str | None = None
    download_status: int = 200
    image_format: str | None = None  # force a Pillow format; None honours the request's output_format
    # What the fake saw.
    submissions: list[dict[str, Any]] = field(default_factory=list)
    tasks: list[Task] = field(default_factory=list)
    polls: list[str] = field(default_factory=list)  # task ids, one per poll request
    downloads: list[str] = field(default_factory=list)  # paths
    download_keys: list[str | None] = field(default_factory=list)  # x-key header sent with each download

    def __post_init__(self) -> None:
        self.app = Starlette(
            routes=[
                Route("/v1/get_result", self.get_result, methods=["GET"]),
                Route("/v1/{model}", self.submit, methods=["POST"]),
                Route("/delivery/{name}", self.delivery, methods=["GET"]),
            ]
        )

    def task(self, task_id: str) -> Task | None:
        return next((task for task in self.tasks if task.id == task_id), None)

    async def submit(self, request: Request) -> Response:
        model = request.path_params["model"]
        if model not in FIELDS:
            return JSONResponse({"detail": "Not Found"}, 404)
        if request.headers.get("x-key") != self.key:
            return JSONResponse({"detail": ERROR_DETAILS[401]}, 401)
        body = await request.json()
        self.submissions.append(body)
        await asyncio.sleep(self.submit_delay)
        if self.submit_html:
            return HTMLResponse("<html><body>Bad gateway</body></html>", self.submit_status or 200)
        if self.submit_status is not None:
            return JSONResponse({"detail": ERROR_DETAILS.get(self.submit_status, "error")}, self.submit_status)
        problems = validate(model, body)
        if problems:
            return JSONResponse({"detail": problems}, 422)
        output_format = body.get("output_format") or "jpeg"
        size = output_size(model, body)
        task = Task(uuid.uuid4().hex, model, body, size, self.image_format or FORMATS[output_format])
        self.tasks.append(task)
        base = str(request.base_url).rstrip("/")
        polling_url = self.polling_url_override or f"{base}/v1/get_result?id={task.id}"
        if self.submit_response is not None:
            return JSONResponse(self.submit_response)
        answer = {"id": task.id, "polling_url": polling_url, "cost": COST.get(model)}
        if isinstance(body.get("webhook_url"), str):  # BFL's AsyncWebhookResponse: no polling_url
            answer = {"id": task.id, "status": "Pending", "webhook_url": body["webhook_url"], "cost": COST.get(model)}
            self.later(lambda: self.end(task, base), body["webhook_url"])
        if model in FLUX2:  # its price depends on the megapixels: the fake reports them, not what they cost
            answer |= {"cost": None, "output_mp": round(size[0] * size[1] / 1_000_000, 2)}
        return JSONResponse(answer)

    async def get_result(self, request: Request) -> Response:
        task_id = request.query_params.get("id", "")
        self.polls.append(task_id)
        if request.headers.get("x-key") != self.key:
            return JSONResponse({"detail": ERROR_DETAILS[401]}, 401)
        if self.poll_garbage:
            return HTMLResponse("<html><body><h1>502 Bad Gateway</h1></body></html>")
        if self.poll_status is not None:
            return JSONResponse({"detail": ERROR_DETAILS.get(self.poll_status, "error")}, self.poll_status)
        task = self.task(task_id)
        if task is None:
            return JSONResponse({"id": task_id, "status": "Task not found"})
        status = self.status_at(self.tasks.index(task), task.polls)
        if "webhook_url" in task.body:
            status = self.status_at(self.tasks.index(task), ENDED) if task.ended else "Pending"
        task.polls += 1
        answer: dict[str, Any] = {"id": task.id, "status": status, "result": None, "details": None}
        if status == "Ready":
            ext = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}.get(task.format, "img")
            base = str(request.base_url).rstrip("/")
            sample = self.sample_url_override or f"{base}/delivery/{task.id}.{ext}"
            answer["result"] = {"sample": sample, "prompt": task.body.get("prompt"), "seed": 42}
        elif status == "Error":
            answer["details"] = self.error_details
        return JSONResponse(answer)

    def end(self, task: Task, base: str) -> dict[str, Any]:
        """End a task submitted with a webhook_url; what BFL POSTs to it."""
        task.ended = True
        status = self.status_at(self.tasks.index(task), ENDED)
        sample = f"{base}/delivery/{task.id}.{task.format.lower()}" if status == "Ready" else None
        return {"id": task.id, "status": status, "result": {"sample": sample} if sample else None}

    def status_at(self, index: int, poll: int) -> str:
        """What the `index`-th task answers to its `poll`-th poll; the last status repeats."""
        sequence = self.statuses_for.get(index) or self.status_sequence
        if sequence is None:
            sequence = ["Pending"] * self.pending_polls + [self.moderate or "Ready"]
        return sequence[min(poll, len(sequence) - 1)]

    async def delivery(self, request: Request) -> Response:
        self.downloads.append(request.url.path)
        self.download_keys.append(request.headers.get("x-key"))
        task = self.task(request.path_params["name"].split(".")[0])
        if self.download_status != 200 or task is None:
            status = self.download_status if self.download_status != 200 else 404
            return Response(b"<Error><Code>BlobNotFound</Code></Error>", status, media_type="application/xml")
        image = Image.new("RGB", task.size, (40, 90, 160))
        buffer = io.BytesIO()
        image.save(buffer, task.format)
        return Response(buffer.getvalue(), media_type=f"image/{task.format.lower()}")


def validate(model: str, body: Any) -> list[dict[str, Any]]:
    """FastAPI-style validation errors (`HTTPValidationError.detail`) for the fields we check."""
    if not isinstance(body, dict):
        return [{"loc": ["body"], "msg": "Input should be a valid dictionary", "type": "dict_type"}]
    problems = [
        {"loc": ["body", name], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}
        for name in body
        if name not in FIELDS[model]
    ]
    if model in FLUX2:
        return problems + flux2_problems(body) + image_problems(model, body)
    for name in ("width", "height"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or not 256 <= value <= 1440 or value % 32:
            msg = "Input should be a multiple of 32 between 256 and 1440"
            problems.append({"loc": ["body", name], "msg": msg, "type": "value_error"})
    ratio = body.get("aspect_ratio")
    if ratio is not None and parse_ratio(ratio) is None:
        msg = "Aspect ratio must be W:H between 21:9 and 9:21"
        problems.append({"loc": ["body", "aspect_ratio"], "msg": msg, "type": "value_error"})
    if body.get("output_format") not in (None, *FORMATS):
        msg = "Input should be 'jpeg', 'png' or 'webp'"
        problems.append({"loc": ["body", "output_format"], "msg": msg, "type": "enum"})
    return problems + image_problems(model, body)


def flux2_problems(body: dict[str, Any]) -> list[dict[str, Any]]:
    problems = []
    width, height = body.get("width", 1024), body.get("height", 1024)
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value < 64 or value % 16:
            msg = "Input should be a multiple of 16, at least 64"
            problems.append({"loc": ["body", name], "msg": msg, "type": "value_error"})
    if not problems and width * height > MAX_PIXELS:
        problems.append({"loc": ["body", "width"], "msg": "At most 4 megapixels", "type": "value_error"})
    checks = (
        ("output_format", body.get("output_format", "jpeg") in ("jpeg", "png")),
        ("safety_tolerance", body.get("safety_tolerance", 2) in range(6)),
        ("steps", body.get("steps", 50) in range(1, 51)),
        ("guidance", 1.5 <= body.get("guidance", 4.5) <= 10),
    )
    for name, valid in checks:
        if not valid:
            problems.append({"loc": ["body", name], "msg": "Input out of range", "type": "value_error"})
    return problems


def output_size(model: str, body: dict[str, Any]) -> tuple[int, int]:
    """Ultra makes ~4 MP at its aspect ratio, Kontext ~1 MP at its (1:1 by default, or the input's),
    Fill its image's size, the others width x height."""
    if model == ULTRA:
        return ultra_size(body.get("aspect_ratio") or "16:9")
    if model == FILL:
        return decode_image(body["image"]).size  # type: ignore[union-attr]  # validated
    if model in (KONTEXT_PRO, KONTEXT_MAX):
        ratio = parse_ratio(body["aspect_ratio"]) if "aspect_ratio" in body else None
        if ratio is None and "input_image" in body:
            first = decode_image(body["input_image"])
            ratio = first.width / first.height if first else None
        width = round((1_048_576 * (ratio or 1.0)) ** 0.5 / 16) * 16
        return width, round(width / (ratio or 1.0) / 16) * 16
    return body.get("width", 1024), body.get("height", 768)


def image_problems(model: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Kontext's input images and Fill's image and mask must be base64 images; Fill's mask its image's size."""
    names = [name for name in (*FLUX2_INPUTS, "image", "mask") if body.get(name) is not None]
    if model == FILL and "image" not in names:
        names.append("image")
    problems, sizes = [], {}
    for name in names:
        if (image := decode_image(body.get(name))) is not None:
            sizes[name] = image.size
        else:
            problems.append({"loc": ["body", name], "msg": "Invalid image: expected base64", "type": "value_error"})
    if "mask" in sizes and "image" in sizes and sizes["mask"] != sizes["image"]:
        problems.append({"loc": ["body", "mask"], "msg": "Mask must match the image size", "type": "value_error"})
    return problems


def parse_ratio(text: Any) -> float | None:
    """W/H for a `W:H` string between 21:9 and 9:21, else None."""
    try:
        w, h = (int(part) for part in str(text).split(":"))
        ratio = w / h
    except (ValueError, ZeroDivisionError):
        return None
    return ratio if 9 / 21 <= ratio <= 21 / 9 else None


def ultra_size(text: str) -> tuple[int, int]:
    """Ultra's ~4 MP output for an aspect ratio: the observed sizes, else the nearest multiple of 32."""
    if text in ULTRA_SIZES:
        return ULTRA_SIZES[text]
    ratio = parse_ratio(text) or 1.0
    width = round((4_194_304 * ratio) ** 0.5 / 32) * 32
    return width, round(width / ratio / 32) * 32
