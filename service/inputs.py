"""Request bodies -> (encoded images, options). JSON with base64 strings, or multipart `files` plus form fields.

Images stay encoded here (bytes, or base64 text decoded later in the decode threads), so parsing costs the event
loop little; every decision about pixels belongs to `service.decoding`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from service.errors import ImageError, InvalidRequestError, ServiceError

__all__ = ["ParsedInputs", "parse_inputs"]


@dataclass
class ParsedInputs:
    images: list[bytes | str]
    options: dict[str, Any]  # every option, defaults filled in
    given: frozenset[str] = frozenset()  # the options the body itself set (a query parameter may set the others)


class UnsupportedMediaTypeError(ServiceError):
    http_status = 415
    code = "unsupported_media_type"


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


async def parse_inputs(request: Request, model: type[BaseModel], max_images: int) -> ParsedInputs:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json" or ctype.endswith("+json"):
        body = await request.body()
        try:
            parsed = model.model_validate_json(body)
        except ValidationError as exc:
            raise InvalidRequestError(_validation_message(exc)) from None
        data = parsed.model_dump()
        images = data.pop("images", None) or []  # optional where a request may send vectors or an id instead
        if len(images) > max_images:
            raise ImageError(
                f"{len(images)} images in one request; the limit is {max_images}",
                code="too_many_images",
                http_status=413,
            )
        return ParsedInputs(images, data, frozenset(parsed.model_fields_set - {"images"}))
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images, max_fields=16)
        except StarletteHTTPException as exc:  # malformed multipart, or over the file/field counts
            if "files" in str(exc.detail).lower():
                raise ImageError(
                    f"more than {max_images} files in one request", code="too_many_images", http_status=413
                ) from None
            raise InvalidRequestError(f"malformed multipart body: {exc.detail}") from None
        files = form.getlist("files")
        if len(files) > max_images:
            raise ImageError(
                f"{len(files)} files in one request; the limit is {max_images}", code="too_many_images", http_status=413
            )
        images: list[bytes | str] = []
        for item in files:
            if isinstance(item, UploadFile):
                images.append(await item.read())
            else:  # a plain text part named "files": its bytes are the "image"
                images.append(item.encode("utf-8", "surrogateescape"))
        await form.close()
        fields = {k: v for k, v in form.multi_items() if k != "files" and isinstance(v, str)}
        if not images:
            raise InvalidRequestError("multipart body has no `files` part (send one or more images as `files`)")
        try:
            options = model.model_validate({"images": ["-"], **fields}).model_dump()
        except ValidationError as exc:
            raise InvalidRequestError(_validation_message(exc)) from None
        options.pop("images")
        return ParsedInputs(images, options, frozenset(fields))
    raise UnsupportedMediaTypeError(
        f'content type {ctype or "(none)"} is not accepted: send application/json ({{"images": [<base64>]}}) or '
        "multipart/form-data with `files`"
    )
