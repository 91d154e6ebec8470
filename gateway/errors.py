"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` + HTTP status."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = logging.getLogger("distill_gateway")


class GatewayError(Exception):
    """An error answered to the client in OpenAI's shape."""

    status_code = 500
    error_type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status_code: int | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status_code is not None:
            self.status_code = status_code
        if error_type is not None:
            self.error_type = error_type

    def body(self) -> dict[str, dict[str, str | None]]:
        return error_body(self.message, self.error_type, self.param, self.code)


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class PayloadTooLarge(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"


class ModelNotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model '{model}' does not exist: it is not a configured task and no "
            "default_teacher is configured for pass-through.",
            param="model",
            code="model_not_found",
        )


class UpstreamError(GatewayError):
    """The teacher failed after retries and fallbacks."""

    status_code = 502
    error_type = "upstream_error"


class UpstreamTimeout(GatewayError):
    status_code = 504
    error_type = "timeout"


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(error: GatewayError) -> Response:
    return Response(
        orjson.dumps(error.body()), status_code=error.status_code, media_type="application/json"
    )


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's shape; no stack trace reaches the client."""

    async def gateway_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return error_response(exc)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "not_found" if exc.status_code == 404 else None
        return error_response(
            GatewayError(str(exc.detail), status_code=exc.status_code, error_type=kind, code=code)
        )

    async def validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first["loc"] if p not in ("body", "query", "path")]
        return error_response(
            InvalidRequest(f"{'.'.join(loc) or 'request'}: {first['msg']}", param=".".join(loc))
        )

    async def unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error", exc_info=exc)
        return error_response(GatewayError("internal error in the gateway", code="internal_error"))

    app.add_exception_handler(GatewayError, gateway_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
