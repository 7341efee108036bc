"""Checks of a request's body shared by the protocols: JSON, field types and ranges, the model's name, the
sampling settings, images; each failure a 400 (or 404) ApiError naming the field."""
from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request as HttpRequest
from pydantic import BaseModel, ValidationError

from cluster.server.errors import ApiError, validation_error
from cluster.server.service import Service
from runtime.sampling import SamplingParamError, SamplingParams

Body = TypeVar("Body", bound=BaseModel)


async def parse_body(http: HttpRequest, body_type: type[Body]) -> Body:
    """The request body as `body_type`: JSON (NaN and Infinity refused), field types and ranges."""
    raw = await http.body()
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return body_type.model_validate(data)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def _refuse_constant(name: str):
    """NaN and Infinity are not JSON, though Python's parser takes them."""
    raise json.JSONDecodeError(f"{name} is not a JSON value", name, 0)


def check_model(service: Service, name: str | None) -> None:
    """Any name is this server's model unless the service is strict about names."""
    if service.strict_model_name and name is not None and name != service.model_name:
        raise ApiError(404, f"the model '{name}' does not exist here; this server serves '{service.model_name}'",
                       param="model", code="model_not_found")


def images_not_supported(param: str) -> ApiError:
    """An image in a message: refused rather than dropped, which would leave the model answering without it."""
    return ApiError(400, "images are not supported yet: this server reads text only; send the message without the "
                         "image, or describe it in words", param=param, code="invalid_value")


def sampling_params(**settings: Any) -> SamplingParams:
    """SamplingParams, with a setting it refuses as a 400 that names the field."""
    try:
        return SamplingParams(**settings)
    except SamplingParamError as e:
        raise ApiError(400, f"invalid value for '{e.field}': must be {e.allowed}, got {e.value!r}", param=e.field,
                       code="invalid_value") from None
