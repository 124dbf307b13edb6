"""Pieces both route families use: errors in each family's shape, the API-key check, image encoding.

Errors: the page's JSON API (/api) answers `{"detail": "one line"}`; the OpenAI-compatible API (/v1) answers
`{"error": {"message", "type", "param", "code"}}` as OpenAI does, so its official clients raise their usual
exceptions. Which shape a response takes follows from the request path alone.
"""

from __future__ import annotations

import base64
import io
import json
import secrets
from typing import Annotated, Any

import torch
from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image

from ..transforms import RESIZE_FILTER, BadImage, decode_image, to_pil

OPENAI_PREFIX = "/v1/"


class ApiError(HTTPException):
    """An HTTP error with OpenAI's optional `param` (the request field at fault) and `code`."""

    def __init__(
        self,
        status_code: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(status_code, message, headers=headers)
        self.param = param
        self.code = code


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def error_content(path: str, status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The error body for a request to `path`: OpenAI's shape under /v1/, `{"detail": ...}` elsewhere."""
    message = one_line(message)
    if path.startswith(OPENAI_PREFIX):
        kind = "server_error" if status >= 500 else "invalid_request_error"
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return {"detail": message}


def error_bytes(path: str, status: int, message: str, code: str | None = None) -> bytes:
    return json.dumps(error_content(path, status, message, code=code)).encode()


def field_of(location: tuple | list) -> str | None:
    """The request field named by a pydantic error location such as ("body", "n") or ("query", "k")."""
    sections = ("body", "query", "path", "form", "header", "cookie")
    names = [str(part) for part in location if part not in sections and not isinstance(part, int)]
    return ".".join(names) or None


# ------------------------------------------------------------------------------------------ API key


_bearer = HTTPBearer(auto_error=False, description="the server's --api-key, when it was started with one")


def api_key_check(api_key: str | None) -> Any:
    """A FastAPI dependency: 401 unless the request carries `Authorization: Bearer API_KEY`. Without an api_key
    every request passes."""

    def check(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        if api_key is None:
            return
        given = credentials.credentials if credentials is not None else None
        problem = key_problem(api_key, given)
        if problem is not None:
            raise ApiError(401, problem[1], code=problem[0], headers={"WWW-Authenticate": "Bearer"})

    return check


def key_problem(api_key: str, given: str | None) -> tuple[str, str] | None:
    """(code, message) when the bearer token `given` is missing or is not `api_key`; None when it is."""
    if given is None:
        return "missing_api_key", "this server needs an API key: send the header 'Authorization: Bearer KEY'"
    if not secrets.compare_digest(given.encode(), api_key.encode()):
        return "invalid_api_key", "the API key is not valid"
    return None


# ------------------------------------------------------------------------------------------ images


def decode_upload(data: bytes, name: str, param: str | None = None, *, max_pixels: int) -> Image.Image:
    """Upload bytes -> RGB image; garbage, truncated files, decompression bombs and images above `max_pixels` are
    a 400 naming the file."""
    try:
        return decode_image(data, name, max_pixels)
    except BadImage as error:
        raise ApiError(400, str(error), param=param, code="invalid_image") from None


def png_bytes(image: torch.Tensor | Image.Image, size: int | None = None) -> bytes:
    """An image (3, H, W) in [0, 1] or a PIL image as PNG bytes, resized to size x size when given."""
    picture = to_pil(image) if isinstance(image, torch.Tensor) else image
    if size is not None and picture.size != (size, size):
        picture = picture.resize((size, size), RESIZE_FILTER)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
