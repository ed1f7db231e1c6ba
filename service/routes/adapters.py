"""What the protocol adapters (OpenAI /v1, KServe /v2) share: the served model's name and JSON bodies parsed with
the offending parameter named. The pipeline itself is /embed's (service.routes.inference.embed_vectors)."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from service.engine import Engine
from service.errors import InvalidRequestError, ServiceError

__all__ = ["ModelNotFoundError", "ParamError", "check_model", "read_json", "served_model_name", "served_names"]

M = TypeVar("M", bound=BaseModel)


class ParamError(InvalidRequestError):
    """A bad request parameter, named in `param` (OpenAI's error field)."""

    def __init__(self, message: str, *, param: str | None, code: str = "invalid_request", http_status: int = 422):
        super().__init__(message)
        self.param = param
        self.code = code
        self.http_status = http_status


class ModelNotFoundError(ServiceError):
    http_status = 404
    code = "model_not_found"


def served_model_name(engine: Engine) -> str:
    return engine.settings.served_model_name or engine.backend.info.config.name


def served_names(engine: Engine) -> set[str]:
    """Names a client may use for the served model: its served name and its model id."""
    return {served_model_name(engine), engine.backend.info.model_id}


def check_model(engine: Engine, name: str) -> str:
    if name not in served_names(engine):
        raise ModelNotFoundError(
            f"the model {name!r} does not exist here; this server serves {served_model_name(engine)!r}"
        )
    return served_model_name(engine)


async def read_json(request: Request, model: type[M]) -> M:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise ParamError(
            f"content type {ctype or '(none)'} is not accepted: send application/json",
            param=None,
            code="unsupported_media_type",
            http_status=415,
        )
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ())]
        where = ".".join(loc)
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ParamError(
            f"{where or 'body'}: {err.get('msg', 'invalid')}{more}", param=loc[0] if loc else None
        ) from None
