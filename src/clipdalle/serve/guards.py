"""What a request must pass before any route reads it: the host name it was sent to, and the API key.

Both are ASGI middleware, so they answer before the body is read: a request to a name the server was not started
for (a DNS-rebinding page's) or without the key costs no upload spooled to disk and no JSON parsed, and gets its
error in the route family's shape (`common.error_content`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .common import key_problem


def host_name(value: str) -> str:
    """A Host header (or a name given on the command line) without its port, brackets and trailing dot, lower case:
    "LocalHost:8000" -> "localhost", "[::1]:8000" -> "::1"."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value[1:]
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


class HostCheck:
    """Answers 400 to an HTTP request whose Host header names none of `allowed` ("*" allows any name)."""

    def __init__(self, app: Any, allowed: Iterable[str], error_body: Callable[..., bytes]):
        self.app = app
        self.allowed = {host_name(name) for name in allowed}
        self.error_body = error_body  # (path, status, message, code) -> JSON bytes in the family's shape

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or "*" in self.allowed:
            await self.app(scope, receive, send)
            return
        given = next((value.decode("latin-1") for name, value in scope.get("headers", []) if name == b"host"), "")
        if host_name(given) in self.allowed:
            await self.app(scope, receive, send)
            return
        message = (
            f"this server does not answer to the host name {given[:100]!r}; start it with --allowed-host NAME "
            "to accept a name it is reached by"
        )
        await respond(send, self.error_body(scope.get("path", ""), 400, message, "host_not_allowed"), 400)


class ApiKeyFirst:
    """Answers 401 to a request for a path that `needs_key(path)` without `Authorization: Bearer API_KEY`, before
    its body is read. The routes check the key again (their OpenAPI schema declares it)."""

    def __init__(self, app: Any, api_key: str | None, needs_key: Callable[[str], bool], error_body: Callable):
        self.app = app
        self.api_key = api_key
        self.needs_key = needs_key
        self.error_body = error_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or self.api_key is None or scope["method"] == "OPTIONS" or not self.needs_key(path):
            await self.app(scope, receive, send)
            return
        header = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"authorization"), "")
        scheme, _, token = header.strip().partition(" ")
        problem = key_problem(self.api_key, token.strip() if scheme.lower() == "bearer" and token.strip() else None)
        if problem is None:
            await self.app(scope, receive, send)
            return
        code, message = problem
        await respond(send, self.error_body(path, 401, message, code), 401, [(b"www-authenticate", b"Bearer")])


async def respond(send: Callable, body: bytes, status: int, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """A whole JSON response, sent without reading the request."""
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
