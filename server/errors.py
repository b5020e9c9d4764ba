"""Every failure leaves the server as OpenAI's error shape {"error": {message, type, param, code}}.

One mapping from exceptions to status codes; handlers raise, they never build error JSON.
"""

from __future__ import annotations

import json
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from retrieval.errors import (
    IndexNotFoundError,
    IndexUnavailableError,
    InvalidIndexNameError,
    RetrievalError,
)
from server.adapters.errors import AdapterError, AdapterNotFoundError, AdapterUnavailableError
from server.engine.types import EngineError, EngineStoppedError, QueueFullError
from server.protocol import ErrorDetail, ErrorResponse, ProtocolError

logger = logging.getLogger(__name__)


class APIError(Exception):
    status_code = 400
    error_type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers: dict[str, str] = {}

    def detail(self) -> ErrorDetail:
        return ErrorDetail(
            message=self.message, type=self.error_type, param=self.param, code=self.code
        )


class BadRequestError(APIError):
    pass


class AuthenticationError(APIError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(APIError):
    status_code = 403
    error_type = "permission_error"
    code = "insufficient_scope"


class NotFoundError(APIError):
    status_code = 404
    error_type = "not_found_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"

    def __init__(self, model: str, available: list[str]):
        super().__init__(
            f"The model {model!r} does not exist or is not loaded. "
            f"Available: {', '.join(available)}. See GET /v1/models.",
            param="model",
        )


class PayloadTooLargeError(APIError):
    status_code = 413
    code = "payload_too_large"


class RateLimitError(APIError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}


class ServiceUnavailableError(APIError):
    status_code = 503
    error_type = "service_unavailable"
    code = "unavailable"


class InternalError(APIError):
    status_code = 500
    error_type = "server_error"
    code = "internal_error"


def to_api_error(exc: Exception) -> APIError:
    """Map any exception to the error the client sees (no stack traces, ever)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ProtocolError):
        return BadRequestError(str(exc), param=exc.param)
    if isinstance(exc, AdapterError):
        return BadRequestError(str(exc), param=exc.param, code="invalid_adapter")
    if isinstance(exc, InvalidIndexNameError):  # an index name in the path (rag.py maps its own)
        return BadRequestError(str(exc), param="name", code="invalid_index_name")
    if isinstance(exc, IndexNotFoundError):
        return NotFoundError(str(exc), param="rag.index", code="index_not_found")
    if isinstance(exc, IndexUnavailableError):
        return ServiceUnavailableError(str(exc), code="index_unavailable")
    if isinstance(exc, RetrievalError):  # unreadable documents, nothing to index
        return BadRequestError(str(exc), param="sources", code="invalid_documents")
    if isinstance(exc, AdapterUnavailableError):
        return ServiceUnavailableError(str(exc), code="adapter_unavailable")
    if isinstance(exc, AdapterNotFoundError):
        return NotFoundError(str(exc), param="lora_name", code="adapter_not_found")
    if isinstance(exc, QueueFullError):
        return RateLimitError(str(exc), exc.retry_after_s)
    if isinstance(exc, EngineStoppedError):
        return ServiceUnavailableError(str(exc))
    logger.exception("unhandled error", exc_info=exc)
    return InternalError("internal server error; see the server log")


def error_response(error: APIError) -> JSONResponse:
    body = ErrorResponse(error=error.detail()).model_dump()
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


def sse_error(error: APIError) -> str:
    """The streaming variant: one SSE event carrying the same error object."""
    return f"data: {json.dumps(ErrorResponse(error=error.detail()).model_dump())}\n\n"


def _validation_error(exc: RequestValidationError) -> BadRequestError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return BadRequestError(
            f"request body is not valid JSON: {first.get('msg', '')}", code="invalid_json"
        )
    # A value that fits no member of a union yields one error per member; the deepest
    # location names the field the client got wrong.
    best = max(errors, key=lambda e: len(_param_path(e)), default=first)
    message = "; ".join(f"{_param_path(e) or 'body'}: {e.get('msg')}" for e in errors[:5])
    return BadRequestError(message, param=_param_path(best) or None, code="invalid_value")


_TYPE_TAG = re.compile(r"^(str|int|float|bool|list|dict|none)(\[.*\])?$|^[A-Z]\w*(\[.*\])?$")


def _param_path(error: dict) -> str:
    """'rag.top_k' from a pydantic loc, without 'body' and union-member type tags."""
    parts = [str(p) for p in error.get("loc", ()) if p != "body"]
    return ".".join(p for p in parts if not _TYPE_TAG.match(p) and "[" not in p)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: NotFoundError, 401: AuthenticationError, 403: PermissionDeniedError}
        error = kinds.get(exc.status_code, APIError)(str(exc.detail))
        if exc.status_code == 400:  # e.g. a body that is not UTF-8, caught before validation
            error.code = "invalid_body"
        if exc.status_code not in kinds:
            error.status_code = exc.status_code
        return error_response(error)

    async def _on_expected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc))

    # Expected errors get their own handlers: Starlette re-raises whatever reaches the
    # catch-all `Exception` handler, which logs a traceback and drops the keep-alive connection.
    for expected in (
        APIError,
        ProtocolError,
        EngineError,
        AdapterError,
        AdapterNotFoundError,
        IndexNotFoundError,
        IndexUnavailableError,
        InvalidIndexNameError,
        RetrievalError,
    ):
        app.add_exception_handler(expected, _on_expected)

    @app.exception_handler(Exception)
    async def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc))
