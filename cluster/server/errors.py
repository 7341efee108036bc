"""The errors every protocol shares: an ApiError says what is wrong, what to do and which field; each protocol
renders it in its own shape (its module's error_body)."""
from __future__ import annotations


class ApiError(Exception):
    """A request that fails: the HTTP status, what is wrong and what to do, and which field."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def validation_error(errors: list[dict]) -> ApiError:
    first = errors[0]
    param = ".".join(str(p) for p in first["loc"] if p != "body")
    # Union members each report a failure; name the field once with pydantic's first reason.
    return ApiError(400, f"invalid value for '{param}': {first['msg']}", param=param or None,
                    code="missing_required_parameter" if first["type"] == "missing" else "invalid_value")


def openai_error_body(error: ApiError) -> dict:
    """OpenAI's error shape, shared by its chat/completions and Responses protocols."""
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
