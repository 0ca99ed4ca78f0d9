"""Google's Gemini API (generativelanguage.googleapis.com): the Gemini image models ("Nano Banana"), one
synchronous `models/{model}:generateContent` call per image, billed by the token count it answers with.

From Google's docs (ai.google.dev/gemini-api/docs/image-generation, /api/generate-content, and the types of
its `google-genai` client 3.6.1): the prompt and each input image (`inlineData`, base64: several images
compose) are parts of one user turn; `generationConfig.responseModalities` ["IMAGE"] asks for images only;
`imageConfig` takes `aspectRatio` (1:1, 2:3, 3:2, 3:4, 4:3, 9:16, 16:9, 21:9) and, on the Gemini 3 models,
`imageSize` (1K, 2K, 4K; gemini-2.5-flash-image makes 1K only). Images come back as `inlineData` parts of
the first candidate; a refusal comes back as a 200: `promptFeedback.blockReason`, or a candidate's
`finishReason`, or no image at all. Google shut Imagen down (ai.google.dev/gemini-api/docs/imagen): its
names are answered by the catalog's Gemini stand-in routes.
"""

from typing import Any

from qubax.errors import MODEL_NOT_SERVED, ContentPolicyViolation, TaskFailed, UpstreamError
from qubax.pipeline.uploads import encode_inputs
from qubax.protocol import Usage
from qubax.providers import GeneratedImage, ProviderInfo, Tokens, aspect_ratio
from qubax.providers.adapter import Adapter
from qubax.providers.batches import fan_out
from qubax.providers.failures import error_detail
from qubax.providers.replies import Reply
from qubax.routing.request import ImageRequest

NAME, PROVIDER = "google", "Google"
# The aspect ratios the Gemini API documents for imageConfig (google-genai's ImageConfig).
ASPECT_RATIOS = ("21:9", "16:9", "3:2", "4:3", "1:1", "3:4", "2:3", "9:16")
# imageSize tiers, by the pixels of their square: the smallest that holds the size asked is used.
IMAGE_SIZES = (("1K", 1024 * 1024), ("2K", 2048 * 2048), ("4K", 4096 * 4096))
ONE_SIZE = ("gemini-2.5-flash-image",)  # makes 1K images only and takes no imageSize
SHUT_DOWN = ("imagen-",)  # Imagen: shut down on the Gemini API on 2026-08-17
# Google's migration guide (firebase.google.com/docs/ai-logic/imagen-models-migration): Imagen 4 Fast is
# made by Nano Banana 2 thinking at MINIMAL, Imagen 4 at HIGH (the other models think at their default).
THINKING = {"imagen-4.0-fast-generate-001": "MINIMAL", "imagen-4.0-generate-001": "HIGH"}
# Why a turn ends without an image when Google's safety system stopped it (google-genai's FinishReason);
# any other answer without an image is refused alike (the model declined to draw), never retried elsewhere.
SAFETY = ("SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT")


class Google(Adapter):
    name, label = NAME, PROVIDER

    async def generate(self, request: ImageRequest, model: str) -> list[GeneratedImage]:
        if model.startswith(SHUT_DOWN):
            raise shut_down(model)
        inputs = await encode_inputs(request.images, None, fill=False)
        images = inputs.images if inputs is not None else ()
        payload = body(request, model, images)
        # One image a call: `candidateCount` above 1 is not documented for the image models.
        return await fan_out(self._one(payload, model) for _ in range(request.n))

    async def _one(self, payload: dict[str, Any], model: str) -> list[GeneratedImage]:
        url = f"{self.upstream.base_url}/models/{model}:generateContent"
        async with self.upstream.lease() as key:
            response = await self.send("POST", url, headers={"x-goog-api-key": key}, json=payload)
        self._raise_for_error(response, model)
        answer = self.checked_json(response)
        data = first_image(answer)  # raises for a refusal: nothing to bill, nothing another route should retry
        usage = read_usage(answer.get("usageMetadata"))
        return [self.inline_image(data, tokens=Tokens(model, usage) if usage else None)]

    def _raise_for_error(self, response: Reply, model: str) -> None:
        """Google's quirks: a bad key is a 400 (reason API_KEY_INVALID), an unknown model a 404;
        `checked_json` maps the rest (403, 429 RESOURCE_EXHAUSTED, 500, 503)."""
        status = response.status_code
        if status == 400 and "API_KEY_INVALID" in reasons(response):
            raise UpstreamError(
                f"{PROVIDER} could not serve the request ({status}).",
                detail=f"the configured credential was rejected: {error_detail(response)}",
                failover=True,
            )
        if status == 404:
            error = UpstreamError(
                f"The upstream for this model does not serve {model}.",
                detail=f"the Gemini API does not serve it: {error_detail(response) or 'not found'}",
                failover=True,
            )
            error.code = MODEL_NOT_SERVED
            raise error


def body(request: ImageRequest, model: str, images: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """The generateContent request: the prompt and the input images as one user turn, asking for an image
    at the aspect ratio nearest the size asked (fitted to the size afterwards, as every image is)."""
    parts: list[dict[str, Any]] = [{"text": request.prompt}]
    parts += [{"inlineData": {"mimeType": mime, "data": data}} for mime, data in images]
    config: dict[str, Any] = {"aspectRatio": aspect_ratio(request.width, request.height, ASPECT_RATIOS)}
    if model not in ONE_SIZE:
        config["imageSize"] = image_size(request.width, request.height)
    generation: dict[str, Any] = {"responseModalities": ["IMAGE"], "imageConfig": config}
    if level := THINKING.get(request.model.id):
        generation["thinkingConfig"] = {"thinkingLevel": level}
    return {"contents": [{"role": "user", "parts": parts}], "generationConfig": generation}


def image_size(width: int, height: int) -> str:
    pixels = width * height
    return next((name for name, most in IMAGE_SIZES if pixels <= most), IMAGE_SIZES[-1][0])


def first_image(answer: dict[str, Any]) -> str:
    """The base64 of the answer's first image; a blocked prompt, a stopped image or an answer without one
    is Google's refusal to draw it (a 400 for the client, as OpenAI refuses)."""
    feedback = answer.get("promptFeedback")
    if isinstance(feedback, dict) and feedback.get("blockReason"):
        raise ContentPolicyViolation()
    candidates = answer.get("candidates")
    candidate = candidates[0] if isinstance(candidates, list) and candidates else {}
    candidate = candidate if isinstance(candidate, dict) else {}
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    for part in parts if isinstance(parts, list) else []:
        inline = part.get("inlineData") if isinstance(part, dict) else None
        if isinstance(inline, dict) and str(inline.get("mimeType", "")).startswith("image/") and inline.get("data"):
            return str(inline["data"])
    if candidate.get("finishReason") in SAFETY:
        raise ContentPolicyViolation()
    if not candidate and not isinstance(feedback, dict):  # not an answer at all: nothing says why
        raise TaskFailed(f"{PROVIDER} answered without a candidate.")
    raise ContentPolicyViolation(
        f"The model declined to make an image of this request (finish reason {candidate.get('finishReason')})."
    )


def read_usage(found: Any) -> Usage | None:
    """`usageMetadata` in OpenAI's `usage` shape: the prompt's text and image tokens in, the answer's
    image tokens and its text and thinking tokens (billed at the text rate) out."""
    if not isinstance(found, dict) or not isinstance(found.get("promptTokenCount"), int):
        return None
    prompt = found["promptTokenCount"]
    prompt_images = by_modality(found.get("promptTokensDetails")).get("IMAGE", 0)
    candidates = found.get("candidatesTokenCount") or 0
    output = candidates + (found.get("thoughtsTokenCount") or 0)
    output_images = by_modality(found.get("candidatesTokensDetails")).get("IMAGE", candidates)
    return Usage.model_validate(
        {
            "input_tokens": prompt,
            "output_tokens": output,
            "total_tokens": prompt + output,
            "input_tokens_details": {"text_tokens": prompt - prompt_images, "image_tokens": prompt_images},
            "output_tokens_details": {"image_tokens": output_images, "text_tokens": output - output_images},
        }
    )


def by_modality(details: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in details if isinstance(details, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("tokenCount"), int):
            modality = str(entry.get("modality"))
            counts[modality] = counts.get(modality, 0) + entry["tokenCount"]
    return counts


def reasons(response: Reply) -> list[str]:
    """The `reason` of each of a Google error's details (google.rpc.ErrorInfo)."""
    try:
        found = response.json()
    except ValueError:
        return []
    error = found.get("error") if isinstance(found, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    return [str(d.get("reason")) for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def shut_down(model: str) -> UpstreamError:
    """Google shut Imagen down (its :predict answers "not found"): no call is spent to learn it again, and
    the catalog's stand-in route (`only_after`) makes the image."""
    error = UpstreamError(
        f"The upstream for this model does not serve {model}.",
        detail="Google shut the Imagen models down on 2026-08-17 (ai.google.dev/gemini-api/docs/imagen)",
        failover=True,
    )
    error.code = MODEL_NOT_SERVED
    return error


INFO = ProviderInfo(
    name=NAME,
    build=Google,
    credential="GEMINI_API_KEY",
    base_url="https://generativelanguage.googleapis.com/v1beta",
)
