"""The model catalog: one declarative table of what we serve, its limits, prices and upstream routes.
A model's entry is in `models`; the request a check here makes, and its field checks, in `request`."""

import dataclasses
import difflib
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qubax.errors import InvalidRequest, ModelNotFound
from qubax.pipeline.uploads import InputImage
from qubax.protocol import UPLOAD_FIELDS, ImageEditRequest, ImageGenerateRequest
from qubax.routing import lifecycle
from qubax.routing.models import CatalogModel, Grid, TokenPrices
from qubax.routing.request import ImageRequest, check_range, flux_options, gpt_options, parse_size, pick_option

RESPONSE_FORMATS = ("url", "b64_json")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
DEFAULT_EDIT_MODEL = "gpt-image-1.5"  # as OpenAI's own default


@dataclass(frozen=True)
class Catalog:
    """The models this server offers (built-ins plus the operator's file) and per-provider settings."""

    models: tuple[CatalogModel, ...]
    concurrency: Mapping[str, int] = field(default_factory=dict)  # per-key active-task caps by provider
    shut_down: Mapping[str, str] = field(default_factory=dict)  # names no longer served: their successors

    @functools.cached_property
    def named(self) -> dict[str, CatalogModel]:
        """Each model by its id and by each of its aliases (looked up on every request)."""
        names: dict[str, CatalogModel] = {}
        for model in self.models:
            for name in (model.id, *model.aliases):
                names.setdefault(name, model)
        return names

    @functools.cached_property
    def upstream_names(self) -> dict[str, str]:
        """Each upstream's own name for a model (`flux-pro-1.1` at BFL) to the name served here; a
        stand-in route (`only_after`) is not the model it stands in for."""
        names: dict[str, str] = {}
        for model in self.models:
            for route in model.routes:
                if route.only_after is None and route.upstream_model not in self.named:
                    names.setdefault(route.upstream_model.lower(), model.id)
        return names

    def find(self, model_id: str) -> CatalogModel:
        if (model := self.named.get(model_id)) is not None:
            return model
        raise ModelNotFound(
            f"The model `{model_id}` does not exist or you do not have access to it. "
            f"{self.suggestion(model_id)}GET /v1/models lists the models this server offers."
        )

    def suggestion(self, model_id: str) -> str:
        """ "Did you mean …?" for an upstream's own name or a near miss of a served one; else nothing."""
        asked = model_id.lower()
        nearest = self.upstream_names.get(asked)
        if nearest is None:
            close = difflib.get_close_matches(asked, [*self.named, *self.upstream_names], n=1, cutoff=0.75)
            nearest = self.upstream_names.get(close[0], close[0]) if close else None
        return f"Did you mean `{nearest}`? " if nearest else ""

    def asked(self, model_id: str) -> CatalogModel:
        """The model a request names; a name shut down upstream that the catalog does not serve is a 400
        that names its successor (a model it serves is tried: `failover.collect` names the successor once
        its upstreams answer that they no longer serve it)."""
        successor = self.shut_down.get(model_id)
        if successor is not None and model_id not in self.named:
            raise lifecycle.shut_down(model_id, successor)
        return self.find(model_id)

    def token_prices(self, model_id: str) -> "TokenPrices | None":
        """The token rates of the model an upstream call ran, when the catalog knows it by that name."""
        found = self.named.get(model_id)
        return found.token_prices if found and found.id == model_id else None

    def check_edit(self, form: ImageEditRequest) -> ImageRequest:
        """`check` for an edit's fields, with a model that edits; the uploads are checked apart."""
        model = self.asked(form.model or DEFAULT_EDIT_MODEL)
        if not model.edits:
            editors = ", ".join(m.id for m in self.models if m.edits)
            raise InvalidRequest(f"{model.id} does not edit images; models that do: {editors}.", param="model")
        fields = form.model_dump(exclude=UPLOAD_FIELDS | {"input_fidelity"})
        request = self.check(ImageGenerateRequest.model_validate(fields | {"model": model.id}), edit=True)
        fidelity = pick_option(model.id, "input_fidelity", form.input_fidelity, model.input_fidelities, None)
        return dataclasses.replace(request, input_fidelity=fidelity)

    def check_inputs(
        self, request: ImageRequest, size: str | None, images: tuple[InputImage, ...], mask: InputImage | None
    ) -> ImageRequest:
        """An edit's checked uploads against what its model takes, and added to the request; without a
        size asked, a model that follows its input makes the first image's aspect ratio."""
        model = request.model
        if len(images) > model.max_images:
            most = f"{model.max_images} image" + ("s" if model.max_images > 1 else "")
            raise InvalidRequest(f"{model.id} takes at most {most} to edit; got {len(images)}.", param="image")
        if mask is not None and model.mask == "none":
            raise InvalidRequest(
                f"{model.id} does not take a mask: it edits the whole image as the prompt says.", param="mask"
            )
        if mask is None and model.mask == "required" and not images[0].alpha:
            raise InvalidRequest(
                f"{model.id} needs a mask, or a first image whose transparent areas show where to paint.",
                param="mask",
                code="missing_required_parameter",
            )
        changes: dict[str, Any] = {"images": images, "mask": mask}
        if model.size_from_input and size in (None, "auto") and isinstance(model.sizes, Grid):
            changes["width"], changes["height"] = model.sizes.near(images[0].width, images[0].height)
        return dataclasses.replace(request, **changes)

    def check(self, body: ImageGenerateRequest, edit: bool = False) -> ImageRequest:
        """Resolve defaults and enforce the model's limits; raise `InvalidRequest` naming the field."""
        model = self.asked(body.model)
        if not (edit or model.generates):
            raise InvalidRequest(
                f"{model.id} only edits images: send an image and a mask to POST /v1/images/edits.", param="model"
            )
        if not body.prompt.strip():
            raise InvalidRequest("prompt must be a non-empty string.", param="prompt")
        if len(body.prompt) > model.max_prompt_chars:
            raise InvalidRequest(
                f"prompt is {len(body.prompt)} characters long; the maximum for {model.id} is "
                f"{model.max_prompt_chars}.",
                param="prompt",
                code="string_above_max_length",
            )
        check_range("partial_images", body.partial_images, 0, 3)
        if body.stream and body.response_format == "url":
            raise InvalidRequest(
                "A streamed answer carries its images as base64 (b64_json): leave response_format out.",
                param="response_format",
            )
        n = 1 if body.n is None else body.n
        if not 1 <= n <= model.max_n:
            only = "n=1 only" if model.max_n == 1 else f"n between 1 and {model.max_n}"
            raise InvalidRequest(f"{model.id} supports {only}; got n={n}.", param="n")
        width, height = parse_size(model, body.size)
        default_format = "b64_json" if body.stream else model.default_response_format
        response_format = pick_option(
            model.id, "response_format", body.response_format, RESPONSE_FORMATS, default_format
        )
        quality = pick_option(model.id, "quality", body.quality, model.qualities, model.default_quality)
        style = pick_option(model.id, "style", body.style, model.styles, model.default_style)
        output_format = pick_option(model.id, "output_format", body.output_format, OUTPUT_FORMATS, "png") or "png"
        if body.watermark is not None and not model.watermark_extension:
            raise InvalidRequest(f"watermark is a Seedream extension; {model.id} does not take it.", param="watermark")
        return ImageRequest(
            **gpt_options(model, body, output_format),
            **flux_options(model, body),
            model=model,
            prompt=body.prompt,
            width=width,
            height=height,
            n=n,
            response_format=response_format or "url",
            quality=quality,
            style=style,
            output_format=output_format,
            watermark=bool(body.watermark),
            partial_images=body.partial_images or 0,
        )
