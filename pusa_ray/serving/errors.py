"""HTTP errors of the service: one JSON shape, `{"error": {"message", "field", "status"}}`."""

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class ApiError(Exception):
    """An HTTP error with a JSON body naming the offending field."""

    def __init__(
        self, status: int, message: str, field: str | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers or {}


def error_response(
    status: int, message: str, field: str | None = None, headers: dict | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "field": field, "status": status}}
    return JSONResponse(status_code=status, content=body, headers=headers)


async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
    return error_response(error.status, error.message, error.field, error.headers)


async def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    field = ".".join(location) or None
    message = first.get("msg", "invalid request")
    return error_response(400, f"{field}: {message}" if field else message, field)


def install_error_handlers(api: FastAPI) -> None:
    api.add_exception_handler(ApiError, _api_error)
    api.add_exception_handler(RequestValidationError, _validation_error)


def field_of(message: str) -> str | None:
    """The request field an input error is about (`needs --end-image` -> end_image)."""
    flag = re.search(r"--([a-z][a-z-]*)", message)
    if flag and flag.group(1) != "cond":
        return flag.group(1).replace("-", "_")
    for word, field in (("noise", "noise"), ("latent", "keyframes"), ("position", "keyframes")):
        if word in message:
            return field
    return None
