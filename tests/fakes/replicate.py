"""A fake Replicate API (api.replicate.com/v1), written from Replicate's HTTP API docs and the models' schemas.

Create with `POST /v1/models/{owner}/{name}/predictions` (`{"input": {...}}`, answered 201), read it back with
`GET /v1/predictions/{id}` (`urls.get`), stop it with `POST /v1/predictions/{id}/cancel` (`urls.cancel`).
A prediction answers `starting`, then `processing` for `running_polls` polls, then its end. With `Prefer: wait`
and `fast` set, the create answer is already the end. Outputs are served by the fake under `/files/`; all URLs
are built from the incoming request, so they point at wherever `serve()` put the app.

Input validation follows the models' published schemas, but is stricter than Replicate in one way: unknown
inputs are refused (Replicate ignores them), so a misspelt field fails a test instead of being dropped.

Faults are injected by setting attributes on the instance; everything it saw is recorded for asserts.
"""

import asyncio
import base64
import io
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from tests.fakes import decode_data_uri
from tests.fakes.callbacks import CallingBack

PRO = "black-forest-labs/flux-1.1-pro"
ULTRA = "black-forest-labs/flux-1.1-pro-ultra"
SCHNELL = "black-forest-labs/flux-schnell"
PRO_RATIOS = ("custom", "1:1", "16:9", "3:2", "2:3", "4:5", "5:4", "9:16", "3:4", "4:3")
RATIOS = ("21:9", "16:9", "3:2", "4:3", "5:4", "1:1", "4:5", "3:4", "2:3", "9:16", "9:21")
COMMON = {"prompt", "seed", "output_format", "aspect_ratio"}
FIELDS = {
    PRO: COMMON | {"width", "height", "safety_tolerance", "prompt_upsampling", "output_quality", "image_prompt"},
    ULTRA: COMMON | {"raw", "safety_tolerance", "image_prompt", "image_prompt_strength"},
    SCHNELL: COMMON
    | {"megapixels", "num_outputs", "num_inference_steps", "output_quality", "disable_safety_checker", "go_fast"},
}
KONTEXT = ("black-forest-labs/flux-kontext-pro", "black-forest-labs/flux-kontext-max")
FILL = "black-forest-labs/flux-fill-pro"
KONTEXT_FIELDS = COMMON | {"input_image", "safety_tolerance", "prompt_upsampling"}
FIELDS |= {name: KONTEXT_FIELDS for name in KONTEXT}
FIELDS[FILL] = {"prompt", "seed", "output_format", "image", "mask", "steps", "guidance", "outpaint"}
FIELDS[FILL] |= {"safety_tolerance", "prompt_upsampling"}
# FLUX.2 (the models' API pages): `input_images` (8 for pro and max, 10 for flex), `aspect_ratio` "custom"
# with width and height 256-2048 in multiples of 16, safety_tolerance 1-5; flex adds steps and guidance.
FLUX2 = {"black-forest-labs/flux-2-pro": 8, "black-forest-labs/flux-2-max": 8, "black-forest-labs/flux-2-flex": 10}
FLUX2_FIELDS = COMMON | {"input_images", "resolution", "width", "height", "safety_tolerance", "output_quality"}
FIELDS |= {name: FLUX2_FIELDS | {"prompt_upsampling"} for name in FLUX2}
FIELDS["black-forest-labs/flux-2-flex"] |= {"steps", "guidance"}
OUTPUT_FORMATS = {PRO: ("webp", "jpg", "png"), ULTRA: ("jpg", "png"), SCHNELL: ("webp", "jpg", "png")}
OUTPUT_FORMATS |= {name: ("jpg", "png") for name in (*KONTEXT, FILL)} | {name: ("webp", "jpg", "png") for name in FLUX2}
DEFAULT_FORMAT = {PRO: "webp", ULTRA: "jpg", SCHNELL: "webp", FILL: "jpg"} | {name: "png" for name in KONTEXT}
DEFAULT_FORMAT |= {name: "webp" for name in FLUX2}
# Seedream (the models' API pages): `size` 1K (4 only)/2K/4K with an `aspect_ratio`, or "custom" with width and
# height 1024-4096; `image_input` (10 for 4, 14 for 4.5); sequential_image_generation and max_images 1-15.
# Its output is a list of JPEG URIs.
SEEDREAM = {"bytedance/seedream-4": ("1K", "2K", "4K", "custom"), "bytedance/seedream-4.5": ("2K", "4K", "custom")}
SEEDREAM_IMAGES = {"bytedance/seedream-4": 10, "bytedance/seedream-4.5": 14}
SEEDREAM_RATIOS = ("match_input_image", "1:1", "4:3", "3:4", "16:9", "9:16", "3:2", "2:3", "21:9")
SEEDREAM_FIELDS = {"prompt", "image_input", "size", "aspect_ratio", "width", "height", "max_images"}
FIELDS |= {name: SEEDREAM_FIELDS | {"sequential_image_generation", "enhance_prompt"} for name in SEEDREAM}
DEFAULT_FORMAT |= {name: "jpg" for name in SEEDREAM}
PILLOW = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}
# flux-schnell's fixed sizes at megapixels=1 (cog-flux ASPECT_RATIOS); "0.25" halves each side.
SCHNELL_SIZES = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}
NSFW_ERROR = "All generated images contained NSFW content. Try running it again with a different prompt."
TITLES = {401: "Unauthenticated", 402: "Payment Required", 404: "Not found", 422: "Input validation failed"}
DETAILS = {
    401: "You did not pass a valid authentication token",
    402: "You have insufficient credit to run this model. Go to https://replicate.com/account/billing to buy more.",
    429: "Request was throttled. Your rate limit resets in ~30s.",
    500: "Internal server error",
    503: "Service unavailable",
}
TERMINAL = ("succeeded", "failed", "canceled", "aborted")
PREFER_WAIT = re.compile(r"wait(=([1-9]|[1-5][0-9]|60))?")  # `wait` holds up to 60 s; `wait=N`, 1-60


@dataclass
class Prediction:
    id: str
    model: str
    input: dict[str, Any]
    status: str = "starting"
    output: Any = None
    error: str | None = None
    polls: int = 0
    history: list[str] = field(default_factory=list)  # every status it answered with
    webhook: str | None = None


@dataclass
class FakeReplicate(CallingBack):
    key: str = "test-key"
    base_url: str = ""  # for tests' convenience once served; the fake itself reads the request's
    # How predictions end. Default: `running_polls` polls answer processing, the next succeeds.
    fast: bool = False  # with `Prefer: wait`, the create answer is already the end
    running_polls: int = 1
    fail: str | None = None  # end `failed` with this error text
    final_status: str | None = None  # end with this status instead (canceled, aborted, or nonsense)
    drop: int = 0  # the NSFW filter drops this many outputs (all of them: `failed` with NSFW_ERROR)
    create_status: int | None = None  # answer every create with this status and an RFC 7807 body
    create_delay: float = 0.0  # seconds before a create is answered
    create_garbage: bool = False  # answer creates with an HTML page (a proxy error, say)
    poll_garbage: bool = False
    poll_status: int | None = None  # answer every poll with this status and an RFC 7807 body
    urls_host: str | None = None  # put urls.get / urls.cancel on this host name instead of ours
    output_host: str | None = None  # put output URLs on this host name instead of ours
    data_uris: bool = False  # give outputs as data: URIs instead of URLs
    download_status: int = 200
    # What the fake saw.
    creates: list[dict[str, Any]] = field(default_factory=list)  # request bodies
    create_headers: list[dict[str, str]] = field(default_factory=list)
    predictions: list[Prediction] = field(default_factory=list)
    polls: list[str] = field(default_factory=list)  # prediction ids, one per poll
    cancels: list[str] = field(default_factory=list)
    downloads: list[str] = field(default_factory=list)  # paths
    auth_seen: list[str | None] = field(default_factory=list)  # Authorization of every request, downloads too
    in_flight: int = 0  # predictions created and not yet ended
    peak: int = 0

    def __post_init__(self) -> None:
        self.app = Starlette(
            routes=[
                Route("/v1/models/{owner}/{name}/predictions", self.create, methods=["POST"]),
                Route("/v1/predictions/{id}", self.get, methods=["GET"]),
                Route("/v1/predictions/{id}/cancel", self.cancel, methods=["POST"]),
                Route("/files/{id}/{name}", self.file, methods=["GET"]),
            ]
        )

    def prediction(self, prediction_id: str) -> Prediction | None:
        return next((p for p in self.predictions if p.id == prediction_id), None)

    def authorized(self, request: Request) -> bool:
        self.auth_seen.append(request.headers.get("authorization"))
        return request.headers.get("authorization") == f"Bearer {self.key}"

    async def create(self, request: Request) -> Response:
        model = f"{request.path_params['owner']}/{request.path_params['name']}"
        if not self.authorized(request):
            return problem(401)
        if model not in FIELDS:
            return problem(404, "The requested resource could not be found.")
        body = await request.json()
        self.creates.append(body)
        self.create_headers.append(dict(request.headers))
        await asyncio.sleep(self.create_delay)
        if self.create_status is not None:
            return problem(self.create_status)
        if self.create_garbage:
            return HTMLResponse("<html><body><h1>502 Bad Gateway</h1></body></html>", 201)
        if errors := validate(model, body):
            return problem(422, "".join(f"- {error}\n" for error in errors))
        prediction = Prediction(uuid.uuid4().hex, model, body["input"])
        self.predictions.append(prediction)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        waited = PREFER_WAIT.fullmatch(request.headers.get("prefer", "")) is not None
        if waited and self.fast:
            self.finish(prediction, request)
        elif isinstance(body.get("webhook"), str):  # ends on a timer (`CallingBack`), not by being polled
            prediction.webhook = body["webhook"]
            self.later(lambda: self.called_back(prediction, request), body["webhook"], sign=True)
        headers = {"preference-applied": "wait"} if waited else {}
        return JSONResponse(self.render(prediction, request), 201, headers=headers)

    async def get(self, request: Request) -> Response:
        self.polls.append(request.path_params["id"])
        if not self.authorized(request):
            return problem(401)
        if self.poll_garbage:
            return HTMLResponse("<html><body><h1>502 Bad Gateway</h1></body></html>")
        if self.poll_status is not None:
            return problem(self.poll_status)
        prediction = self.prediction(request.path_params["id"])
        if prediction is None:
            return problem(404, "Not found.")
        if prediction.status not in TERMINAL and prediction.webhook:
            prediction.status = "processing"
        elif prediction.status not in TERMINAL:
            prediction.polls += 1
            if prediction.polls > self.running_polls:
                self.finish(prediction, request)
            else:
                prediction.status = "processing"
        return JSONResponse(self.render(prediction, request))

    async def cancel(self, request: Request) -> Response:
        self.cancels.append(request.path_params["id"])
        if not self.authorized(request):
            return problem(401)
        prediction = self.prediction(request.path_params["id"])
        if prediction is None:
            return problem(404, "Not found.")
        if prediction.status not in TERMINAL:
            self.end(prediction, "canceled")
        return JSONResponse(self.render(prediction, request))

    def called_back(self, prediction: Prediction, request: Request) -> dict[str, Any]:
        """End a prediction created with a webhook (unless it was cancelled); what Replicate POSTs to it."""
        if prediction.status not in TERMINAL:
            self.finish(prediction, request)
        return self.render(prediction, request)

    def end(self, prediction: Prediction, status: str) -> None:
        prediction.status = status
        self.in_flight -= 1

    def finish(self, prediction: Prediction, request: Request) -> None:
        """End the prediction the way the knobs say."""
        if self.final_status is not None:
            self.end(prediction, self.final_status)
            return
        if self.fail is not None:
            prediction.error = self.fail
            self.end(prediction, "failed")
            return
        count = prediction.input.get("num_outputs", 1) if prediction.model == SCHNELL else 1
        kept = count - self.drop
        if kept <= 0:
            prediction.error = NSFW_ERROR
            self.end(prediction, "failed")
            return
        fmt = prediction.input.get("output_format") or DEFAULT_FORMAT[prediction.model]
        outputs = [self.output_uri(request, prediction, f"out-{i}.{fmt}") for i in range(kept)]
        prediction.output = outputs if prediction.model in (SCHNELL, *SEEDREAM) else outputs[0]
        self.end(prediction, "succeeded")

    def output_uri(self, request: Request, prediction: Prediction, name: str) -> str:
        if self.data_uris:
            data = self.image(prediction, name)
            return f"data:image/{name.rsplit('.', 1)[1]};base64,{base64.b64encode(data).decode()}"
        host = self.output_host or request.url.hostname
        return f"{request.url.scheme}://{host}:{request.url.port}/files/{prediction.id}/{name}"

    def render(self, prediction: Prediction, request: Request) -> dict[str, Any]:
        prediction.history.append(prediction.status)
        host = self.urls_host or request.url.hostname
        api = f"{request.url.scheme}://{host}:{request.url.port}/v1/predictions/{prediction.id}"
        return {
            "id": prediction.id,
            "model": prediction.model,
            "version": "hidden",
            "input": prediction.input,
            "logs": "",
            "output": prediction.output,
            "data_removed": False,
            "error": prediction.error,
            "status": prediction.status,
            "created_at": "2026-01-01T00:00:00.000Z",
            "urls": {"get": api, "cancel": f"{api}/cancel", "stream": f"{api}/stream"},
        }

    async def file(self, request: Request) -> Response:
        self.downloads.append(request.url.path)
        self.auth_seen.append(request.headers.get("authorization"))
        prediction = self.prediction(request.path_params["id"])
        if self.download_status != 200 or prediction is None:
            return Response("Not Found", self.download_status if self.download_status != 200 else 404)
        name = request.path_params["name"]
        return Response(self.image(prediction, name), media_type=f"image/{name.rsplit('.', 1)[1]}")

    def image(self, prediction: Prediction, name: str) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", output_size(prediction.model, prediction.input), (40, 90, 160)).save(
            buffer, PILLOW[name.rsplit(".", 1)[1]]
        )
        return buffer.getvalue()


def problem(status: int, detail: str | None = None) -> JSONResponse:
    """An RFC 7807 problem body, the shape every Replicate API error has."""
    title = TITLES.get(status, "Error")
    return JSONResponse({"title": title, "detail": detail or DETAILS.get(status, title), "status": status}, status)


def validate(model: str, body: Any) -> list[str]:
    """What Replicate would refuse in the body (422), as `input.<field>: <why>` lines."""
    if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
        return ["input: Invalid type. Expected: object"]
    given: dict[str, Any] = body["input"]
    errors = [f"input.{name}: Additional property is not allowed" for name in given if name not in FIELDS[model]]
    if not isinstance(given.get("prompt"), str) or not given["prompt"]:
        errors.append("input: prompt is required")
    errors += image_errors(model, given)
    if model in FLUX2:
        return errors + flux2_errors(model, given)
    if model in SEEDREAM:
        return errors + seedream_errors(model, given)
    ratio = given.get("aspect_ratio", "match_input_image" if model in KONTEXT else "1:1")
    if ratio not in (PRO_RATIOS if model == PRO else ("match_input_image", *RATIOS) if model in KONTEXT else RATIOS):
        errors.append(f"input.aspect_ratio: {ratio!r} is not one of the allowed values")
    if model == PRO and ratio == "custom":
        for side in ("width", "height"):
            value = given.get(side)
            if not isinstance(value, int) or not 256 <= value <= 1440 or value % 32:
                errors.append(f"input.{side}: Must be a multiple of 32 between 256 and 1440")
    if given.get("output_format", DEFAULT_FORMAT[model]) not in OUTPUT_FORMATS[model]:
        errors.append(f"input.output_format: must be one of {', '.join(OUTPUT_FORMATS[model])}")
    if "safety_tolerance" in given and given["safety_tolerance"] not in range(1, 7):
        errors.append("input.safety_tolerance: Must be between 1 and 6")
    if given.get("num_outputs", 1) not in range(1, 5):
        errors.append("input.num_outputs: Must be between 1 and 4")
    if given.get("num_inference_steps", 4) not in range(1, 5):
        errors.append("input.num_inference_steps: Must be between 1 and 4")
    if given.get("megapixels", "1") not in ("1", "0.25"):
        errors.append("input.megapixels: must be one of 1, 0.25")
    return errors


def flux2_errors(model: str, given: dict[str, Any]) -> list[str]:
    errors = []
    ratio = given.get("aspect_ratio", "1:1")
    if ratio not in ("match_input_image", *PRO_RATIOS):
        errors.append(f"input.aspect_ratio: {ratio!r} is not one of the allowed values")
    for side in ("width", "height") if ratio == "custom" else ():
        value = given.get(side)
        if not isinstance(value, int) or not 256 <= value <= 2048 or value % 16:
            errors.append(f"input.{side}: Must be a multiple of 16 between 256 and 2048")
    if given.get("output_format", "webp") not in OUTPUT_FORMATS[model]:
        errors.append(f"input.output_format: must be one of {', '.join(OUTPUT_FORMATS[model])}")
    if "safety_tolerance" in given and given["safety_tolerance"] not in range(1, 6):
        errors.append("input.safety_tolerance: Must be between 1 and 5")
    if given.get("steps", 30) not in range(1, 51):
        errors.append("input.steps: Must be between 1 and 50")
    if not 1.5 <= given.get("guidance", 4.5) <= 10:
        errors.append("input.guidance: Must be between 1.5 and 10")
    images = given.get("input_images", [])
    if len(images) > FLUX2[model] or any(decode_data_uri(uri) is None for uri in images):
        errors.append(f"input.input_images: at most {FLUX2[model]} readable images")
    return errors


def seedream_errors(model: str, given: dict[str, Any]) -> list[str]:
    errors = []
    if given.get("size", "2K") not in SEEDREAM[model]:
        errors.append(f"input.size: must be one of {', '.join(SEEDREAM[model])}")
    if given.get("aspect_ratio", "match_input_image") not in SEEDREAM_RATIOS:
        errors.append(f"input.aspect_ratio: {given['aspect_ratio']!r} is not one of the allowed values")
    for side in ("width", "height"):
        if given.get(side, 2048) not in range(1024, 4097):
            errors.append(f"input.{side}: Must be between 1024 and 4096")
    if given.get("max_images", 1) not in range(1, 16):
        errors.append("input.max_images: Must be between 1 and 15")
    images = given.get("image_input", [])
    if len(images) > SEEDREAM_IMAGES[model] or any(decode_data_uri(uri) is None for uri in images):
        errors.append(f"input.image_input: at most {SEEDREAM_IMAGES[model]} readable images")
    return errors


def image_errors(model: str, given: dict[str, Any]) -> list[str]:
    """File inputs are URLs; the fake reaches none but data URIs. Fill needs its image; Kontext takes
    safety_tolerance above 2 only without an input image."""
    errors = [f"input.{name}: is required" for name in ("image",) if model == FILL and name not in given]
    for name in ("input_image", "image", "mask"):
        if name in given and decode_data_uri(given[name]) is None:
            errors.append(f"input.{name}: could not read the file")
    if model in KONTEXT and "input_image" in given and given.get("safety_tolerance", 2) > 2:
        errors.append("input.safety_tolerance: 2 is the maximum when input images are used")
    return errors


def output_size(model: str, given: dict[str, Any]) -> tuple[int, int]:
    """The size the model really produces: pro honours width/height; ultra ~4 MP; schnell fixed sizes;
    Fill its image's size; Kontext ~1 MP at its aspect ratio (default: the input image's)."""
    if model in SEEDREAM:
        return seedream_size(given)
    if model == FILL:
        return decode_data_uri(given["image"]).size  # type: ignore[union-attr]  # validated
    ratio = given.get("aspect_ratio", "match_input_image" if model in KONTEXT else "1:1")
    if ratio == "match_input_image":
        first = decode_data_uri(given.get("input_image"))
        ratio = f"{first.width}:{first.height}" if first else "1:1"
    if model in (PRO, *FLUX2) and ratio == "custom":
        return given["width"], given["height"]
    if model == SCHNELL:
        width, height = SCHNELL_SIZES[ratio]
        return (width // 2, height // 2) if given.get("megapixels") == "0.25" else (width, height)
    w, h = (int(part) for part in ratio.split(":"))
    pixels = 4_194_304 if model == ULTRA else 1_048_576
    width = round((pixels * w / h) ** 0.5 / 32) * 32
    return width, round(width * h / w / 32) * 32


def seedream_size(given: dict[str, Any]) -> tuple[int, int]:
    """Custom sizes as asked; a preset at its aspect ratio (default: the first input's, or 1:1), 2K about
    4 MP (1K one, 4K sixteen), as Replicate's logs say ("Generating 2304x1728 image with aspect ratio 4:3")."""
    if given.get("size") == "custom":
        return given.get("width", 2048), given.get("height", 2048)
    ratio = given.get("aspect_ratio", "match_input_image")
    if ratio == "match_input_image":
        first = decode_data_uri((given.get("image_input") or [None])[0])
        ratio = f"{first.width}:{first.height}" if first else "1:1"
    w, h = (int(part) for part in ratio.split(":"))
    side = {"1K": 1024, "2K": 2048, "4K": 4096}[given.get("size", "2K")]
    width = round(side * (w / h) ** 0.5 / 16) * 16
    return width, round(width * h / w / 16) * 16
