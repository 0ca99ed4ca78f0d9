"""OpenAI wire types, named as OpenAI names them. Nothing here knows about providers or storage."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr


class ImageGenerateRequest(BaseModel):
    """Body of `POST /v1/images/generations`. `None` always means "use the model's default"."""

    # Strict types: OpenAI answers 400 for `"n": "2"`, and so do we.
    model_config = ConfigDict(extra="forbid", strict=True)

    model: StrictStr
    prompt: StrictStr
    n: StrictInt | None = None
    size: StrictStr | None = None
    response_format: StrictStr | None = None
    quality: StrictStr | None = None
    style: StrictStr | None = None
    user: StrictStr | None = None
    # FLUX extensions (not OpenAI's): OpenAI clients never send them and see no difference.
    seed: StrictInt | None = None
    output_format: StrictStr | None = None
    safety_tolerance: StrictInt | None = None


class Image(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[Image]


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class Error(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: Error
