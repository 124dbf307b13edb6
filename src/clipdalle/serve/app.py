"""The app factory: the page, the JSON API (/api, routes by concern in *_routes.py), the OpenAI-compatible images
API (/v1, openai_api.py), error responses in each family's shape, and the request-size cap.

    app = create_app(load_models("runs/demo"), ServeSettings(api_key="secret"))
    uvicorn.run(app, host="127.0.0.1", port=8000)       # what `clipdalle serve` does

Before a route runs, guards.py checks the Host header (only the names the server was started for: a page that
rebinds its own name to 127.0.0.1 gets 400) and the API key (before the body is read), and limits.py caps the
body. Image decoding, encoding and searches run on the thread pool a few at a time (limits.WorkLimiter; faiss
and the index's metadata are guarded by the index's own lock); generation goes through the bounded queue in
limits.py, one request at a time, cancelled when its client leaves. The OpenAPI docs are at /docs, served with
the Swagger UI files of the `fastapi-offline` package, so they work without a CDN.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .clip_routes import clip_router
from .common import ApiError, api_key_check, error_bytes, error_content, field_of, one_line
from .context import ServeContext
from .describe_routes import describe_router
from .generation_routes import generation_router
from .guards import ApiKeyFirst, HostCheck
from .limits import BodySizeLimit, Busy, ClientGone, GenerationQueue, WorkLimiter
from .models import ServeModels, ServeSettings
from .openai_api import openai_router
from .schemas import ErrorDetail, error_responses
from .search_routes import search_router

STATIC_DIR = Path(__file__).parent / "static"


# ------------------------------------------------------------------------------------------ the factory


def create_app(models: ServeModels, settings: ServeSettings | None = None) -> FastAPI:
    """A FastAPI app serving `models` (loaded once by the caller) under `settings`: the page at /, the JSON API
    under /api, the OpenAI-compatible images API under /v1 and OpenAPI docs at /docs."""
    settings = settings or ServeSettings()
    queue = GenerationQueue(settings.max_queue)
    context = ServeContext(models, settings, queue, WorkLimiter(settings.work_slots, settings.max_waiting_work))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        queue.close()  # the worker finishes the queued jobs, then stops

    app = FastAPI(
        lifespan=lifespan,
        docs_url=None,  # add_docs_routes serves them without a CDN
        redoc_url=None,
        title="clipdalle",
        version=__version__,
        description="Search a collection by text or image, classify and moderate with CLIP, generate and edit "
        "images with DALL·E. The /v1 routes follow OpenAI's images API.",
    )
    app.state.models = models
    app.state.settings = settings
    app.state.queue = queue
    app.state.work = context.work
    add_error_handlers(app)
    api = APIRouter(
        prefix="/api",
        dependencies=[Depends(api_key_check(settings.api_key))],
        responses=error_responses(ErrorDetail),
    )
    routers = (search_router(context), clip_router(context), generation_router(context), describe_router(context))
    for router in routers:
        api.include_router(router)
    app.include_router(api)
    app.include_router(openai_router(context))
    add_page_routes(app)
    add_docs_routes(app)
    # The last added runs first: CORS, then the Host check, then the key, then the body cap.
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_request_bytes,
        error_body=error_bytes,
        timeout=settings.body_timeout_seconds,
    )
    app.add_middleware(ApiKeyFirst, api_key=settings.api_key, needs_key=needs_key, error_body=error_bytes)
    app.add_middleware(HostCheck, allowed=settings.allowed_hosts, error_body=error_bytes)
    if settings.cors_origins:  # added last: outermost, so errors and 413s carry CORS headers too
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After", "X-Native-Size"],
        )
    return app


def needs_key(path: str) -> bool:
    """Whether a path is an API route (every /api and /v1 route but the OpenAI `url` images, whose url is the
    secret); the page, its assets and the docs are public."""
    return path.startswith("/api/") or (path.startswith("/v1/") and not path.startswith("/v1/images/files/"))


def uvicorn_options(settings: ServeSettings) -> dict:
    """How `clipdalle serve` runs uvicorn: connections beyond `max_connections` get 503, idle keep-alive connections
    close after `keep_alive_seconds`."""
    return {
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": settings.keep_alive_seconds,
        "timeout_graceful_shutdown": 10,
        "backlog": 256,
    }


def add_error_handlers(app: FastAPI) -> None:
    def respond(request: Request, status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
        content = error_content(request.url.path, status, message, param, code)
        return JSONResponse(content, status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = error.detail if isinstance(error.detail, str) else one_line(error.detail)
        param, code = getattr(error, "param", None), getattr(error, "code", None)
        return respond(request, error.status_code, message, param, code, getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        field = field_of(first.get("loc", ()))
        message = f"{field}: {first['msg']}" if field else str(first["msg"])
        if first.get("type") == "missing":
            message = f"{field}: this field is required" if field else "the request has no body; expected JSON"
        elif first.get("type") == "json_invalid":
            field, message = None, f"the request body is not valid JSON ({first['msg']})"
        openai = request.url.path.startswith("/v1/")
        return respond(request, 400 if openai else 422, message, field, "invalid_value" if openai else None)

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, error: ValueError) -> JSONResponse:
        return respond(request, 400, str(error))

    @app.exception_handler(Busy)
    async def busy(request: Request, error: Busy) -> JSONResponse:
        headers = {"Retry-After": str(error.retry_after)}
        return respond(request, 503, str(error), code=error.code, headers=headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, error: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, logs show it


def add_page_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def page() -> Response:
        index_html = STATIC_DIR / "index.html"
        if not index_html.is_file():
            raise ApiError(404, "the page is not installed (no serve/static/index.html); the API is at /docs")
        return FileResponse(index_html, media_type="text/html")

    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def add_docs_routes(app: FastAPI) -> None:
    """/docs (Swagger UI) from the files the `fastapi-offline` package ships, so the docs need no CDN; without that
    package, FastAPI's page, which loads Swagger UI from a CDN."""
    from fastapi.openapi.docs import get_swagger_ui_html

    try:
        import fastapi_offline
    except ImportError:
        assets, prefix = None, None
    else:
        assets, prefix = Path(fastapi_offline.__file__).parent / "static", "/docs-assets"
        app.mount(prefix, StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        if assets is None:
            return get_swagger_ui_html(openapi_url=app.openapi_url, title="clipdalle API (Swagger UI from a CDN)")
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title="clipdalle API",
            swagger_js_url=f"{prefix}/swagger-ui-bundle.js",
            swagger_css_url=f"{prefix}/swagger-ui.css",
            swagger_favicon_url=f"{prefix}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # Swagger UI would otherwise ask validator.swagger.io
        )
