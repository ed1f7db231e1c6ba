"""Domain errors and the one place that maps them to HTTP.

Every error the service answers has the body `{"error": {"code": <stable snake_case>, "message": <for humans>}}`.
Routes and the batcher raise `ServiceError` subclasses; anything else that carries `http_status` and `code`
attributes (the index's `VectorIndexError`s) maps the same way. FastAPI's request validation and Starlette's 404/405
are translated here too, so no handler in a route ever builds an error response itself. A 405 lists every method
the path answers in `Allow`, and OPTIONS on an existing path answers 204 with that `Allow` (no route declares
OPTIONS, so it arrives here as a 405).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Scope

__all__ = [
    "BackendUnavailableError",
    "BodyTooLargeError",
    "ClientDisconnectedError",
    "DeadlineExceededError",
    "ImageError",
    "InferenceFailedError",
    "InvalidRequestError",
    "NoHeadError",
    "NoIndexError",
    "NotReadyError",
    "OverloadedError",
    "ServiceError",
    "TooManyItemsError",
    "UnauthorizedError",
    "allowed_methods",
    "dialect_error",
    "error_body",
    "install_error_handlers",
]

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of every error answered on purpose. `code` is stable API; `message` may change."""

    http_status = 500
    code = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidRequestError(ServiceError):
    http_status = 422
    code = "invalid_request"


class TooManyItemsError(InvalidRequestError):
    """More ids or vectors in one index request than index_max_items_per_request."""

    code = "too_many_items"


class ImageError(ServiceError):
    """An input image we refuse: code says why (corrupt_image, unsupported_format, image_too_large, ...)."""

    def __init__(self, message: str, *, code: str, http_status: int = 422, index: int | None = None) -> None:
        where = f"images[{index}]: " if index is not None else ""
        super().__init__(where + message)
        self.code = code
        self.http_status = http_status
        self.index = index


class BodyTooLargeError(ServiceError):
    http_status = 413
    code = "body_too_large"


class UnauthorizedError(ServiceError):
    http_status = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="aim"'})


class NoHeadError(ServiceError):
    http_status = 409
    code = "no_head"


class NoIndexError(ServiceError):
    """/search or /index on a service started without an index (index_path unset): a configuration, not a transient
    state, so 409 rather than a 503 that clients would retry."""

    http_status = 409
    code = "no_index"


class OverloadedError(ServiceError):
    """The admission queue is full: answered at once with Retry-After (seconds, an integer per RFC 9110)."""

    http_status = 429
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after_s)))})


class NotReadyError(ServiceError):
    """Loading, warming up, failed its self-check, or draining."""

    http_status = 503
    code = "not_ready"

    def __init__(self, message: str, *, code: str = "not_ready", retry_after_s: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, int(retry_after_s)))})
        self.code = code


class DeadlineExceededError(ServiceError):
    """The request's deadline passed; `stage` names where the time went (decode, queue, compute)."""

    http_status = 504
    code = "deadline_exceeded"

    def __init__(self, message: str, *, stage: str) -> None:
        super().__init__(message)
        self.stage = stage


class InferenceFailedError(ServiceError):
    """The backend raised on this input alone (the batch was bisected down to it). The message is generic: the
    backend's exception text can hold server paths and internals, so it goes to the server log, not the client;
    `index` names the request's image."""

    http_status = 500
    code = "inference_failed"

    def __init__(self, message: str, *, index: int | None = None) -> None:
        super().__init__((f"images[{index}]: " if index is not None else "") + message)
        self.index = index


class BackendUnavailableError(ServiceError):
    """A backend that cannot run here (package or GPU missing); raised at startup, never per request."""

    http_status = 503
    code = "backend_unavailable"


class ClientDisconnectedError(ServiceError):
    """The client went away before its answer was ready; its work was dropped. 499 as nginx logs it."""

    http_status = 499
    code = "client_closed_request"


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def _openai_error(status: int, code: str, message: str, param: str | None) -> tuple[int, dict[str, Any]]:
    # OpenAI answers a bad parameter with 400 (our 422) and names the parameter; its SDK reads type/param/code.
    status = 400 if status == 422 else status
    kinds = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
    kind = kinds.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _kserve_error(status: int, code: str, message: str, param: str | None) -> tuple[int, dict[str, Any]]:
    # Open Inference Protocol: {"error": <string>} (tritonclient raises with it); our stable code rides along.
    return (400 if status == 422 else status), {"error": message, "code": code}


def dialect_error(
    path: str, status: int, code: str, message: str, param: str | None = None
) -> tuple[int, dict[str, Any]]:
    """(status, body) of an error in the shape its route's clients expect: the protocol adapters (/v1/...: OpenAI,
    /v2...: KServe v2) speak their clients' dialect, every other route the project's own."""
    if path.startswith("/v1/"):
        return _openai_error(status, code, message, param)
    if path == "/v2" or path.startswith("/v2/"):
        return _kserve_error(status, code, message, param)
    return status, error_body(code, message)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(app: ASGIApp, scope: Scope) -> list[str]:
    """Every method some route answers at this request's path, plus OPTIONS; [] when no route has the path.
    Starlette's own 405 names only the first route whose path matched (`Allow: GET` for /index/items/{id}, which
    also takes DELETE), so OPTIONS and 405 answers ask every route, through the router's public `matches`."""
    router = getattr(app, "router", app)
    found = set()
    for method in _METHODS:
        probe = {**scope, "type": "http", "method": method}
        if any(route.matches(probe)[0] is Match.FULL for route in getattr(router, "routes", ())):
            found.add(method)
    return sorted(found | {"OPTIONS"}) if found else []


def _status_and_code(exc: BaseException) -> tuple[int, str]:
    return int(getattr(exc, "http_status", 500)), str(getattr(exc, "code", "internal_error"))


def _record_failure(request: Request, code: str) -> None:
    # Metrics live on the app's state (one registry per app); the endpoint label is the route path template.
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.record_failure(getattr(request.scope.get("route"), "path", "other"), code)


def error_response(exc: BaseException, request: Request) -> JSONResponse:
    status, code = _status_and_code(exc)
    message = getattr(exc, "message", None) or str(exc) or code
    headers = dict(getattr(exc, "headers", {}) or {})
    _record_failure(request, code)
    index = getattr(exc, "index", None)
    param = getattr(exc, "param", None) or (f"input[{index}]" if index is not None else None)
    status, body = dialect_error(request.url.path, status, code, message, param)
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """The single mapping from exceptions to responses."""

    async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
        if int(getattr(exc, "http_status", 500)) >= 500 and not isinstance(exc, NotReadyError):
            logger.warning("%s on %s: %s", type(exc).__name__, request.url.path, exc)
        return error_response(exc, request)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{loc or 'request'}: {err.get('msg', 'invalid')}")
        return error_response(InvalidRequestError("; ".join(parts) or "invalid request"), request)

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        codes = {
            400: "invalid_request",
            404: "not_found",
            405: "method_not_allowed",
            413: "body_too_large",
            415: "unsupported_media_type",
        }
        headers = dict(exc.headers or {})
        if exc.status_code == 405 and (methods := allowed_methods(request.app, request.scope)):
            headers["Allow"] = ", ".join(methods)
            if request.method == "OPTIONS":  # no route declares OPTIONS: the path exists, so say what it takes
                return Response(status_code=204, headers={"Allow": headers["Allow"]})
        err = ServiceError(str(exc.detail), headers=headers)
        err.http_status = exc.status_code
        err.code = codes.get(exc.status_code, "http_error" if exc.status_code < 500 else "internal_error")
        return error_response(err, request)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: logged with its traceback, answered without internals.
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(ServiceError("internal error; see the server log"), request)

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
    try:  # the index's errors carry http_status/code; map them the same way when the index is installed
        from service.index.errors import VectorIndexError
    except ImportError:  # pragma: no cover - index package absent
        return
    app.add_exception_handler(VectorIndexError, on_service_error)
