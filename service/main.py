"""`create_app(settings)`: the FastAPI application and its lifespan.

Lifespan: the engine starts loading in the background (so /healthz answers at once and /readyz says "loading"),
warms the backend up at the largest batch, checks its outputs against golden reference outputs, opens the vector
index (when `index_path` is set) for the served model's recipe, and only then turns ready. Shutdown stops the
batcher after the server has finished its in-flight requests, frees the backend, then snapshots and closes the
index. SIGTERM handling (readiness first, then drain) lives in `service.server`.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from service.backends.base import InferenceBackend
from service.engine import Engine
from service.errors import install_error_handlers
from service.metrics import ServiceMetrics
from service.middleware import ApiKeyPolicy, ServiceMiddleware
from service.retrieval import Retrieval
from service.routes import analyze, inference, kserve, openai_compat, ops, search, ui
from service.routes.kserve_schemas import InferRequest
from service.routes.openai_schemas import EmbeddingsRequest
from service.routes.text import TEXT_REQUESTS
from service.schemas import ClassifyRequest, EmbedRequest, limit_files_in_spec
from service.search_schemas import AddItemsRequest, SearchRequest
from service.settings import Settings
from service.text import TextService

__all__ = ["create_app", "create_app_from_env"]

logger = logging.getLogger(__name__)

API_VERSION = "1.0.0"
DOCS_ASSETS = "/docs/assets"


def _docs_assets() -> Path | None:
    """Swagger UI and ReDoc as the fastapi-offline wheel ships them (a [serve] dependency); None if absent."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def _install_docs(app: FastAPI, assets: Path) -> None:
    """/docs and /redoc from assets this process serves: FastAPI's defaults load them from a CDN, so the pages
    were blank on an air-gapped host. Same paths as FastAPI's (/docs, /redoc, /docs/oauth2-redirect)."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=assets), name="docs-assets")

    def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        )

    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,  # fonts.googleapis.com is a CDN too; the system fonts do
        )

    app.add_api_route("/docs", swagger, methods=["GET"], include_in_schema=False)
    app.add_api_route("/redoc", redoc, methods=["GET"], include_in_schema=False)
    app.add_api_route(
        "/docs/oauth2-redirect", get_swagger_ui_oauth2_redirect_html, methods=["GET"], include_in_schema=False
    )


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated spec plus the JSON request models the routes parse by hand (they accept multipart too)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    # A copy: the routes' openapi_extra dicts are module-level and shared by every app, whose limits may differ.
    schema = copy.deepcopy(schema)
    limit_files_in_spec(schema, app.state.settings.max_images_per_request)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    # The text bodies (LiT models) share the routes; declared as components so clients see their fields.
    for model in (
        EmbedRequest,
        ClassifyRequest,
        SearchRequest,
        AddItemsRequest,
        EmbeddingsRequest,
        InferRequest,
        analyze.AnalyzeRequest,
        *TEXT_REQUESTS,
    ):
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(js.pop("$defs", {}))
        components[model.__name__] = js
    app.openapi_schema = schema
    return schema


def create_app(
    settings: Settings | None = None,
    *,
    backend: InferenceBackend | None = None,
    routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """The service app. `backend` replaces loading from settings (tests, benchmarks); `routers` adds routes
    (extensions; the index's own are always mounted) that share the engine, the error mapping, the API-key policy
    and the metrics."""
    settings = settings or Settings()
    metrics = ServiceMetrics(settings.max_batch_size)
    engine = Engine(settings, metrics, backend=backend)
    retrieval = Retrieval(settings, engine, metrics)
    engine.before_ready.append(retrieval.open)
    text = TextService(settings, engine, metrics)  # LiT models: the text tower's batcher and self-check
    engine.before_ready.append(text.open)
    engine.describers["text"] = text.describe

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            try:
                await engine.stop()
            finally:
                await text.stop()
                await retrieval.stop()

    docs_assets = _docs_assets()
    app = FastAPI(
        title="AIM service",
        version=API_VERSION,
        description="Embeddings and classification from Apple's AIM v1 image models, with dynamic batching.",
        lifespan=lifespan,
        docs_url=None if docs_assets else "/docs",  # local assets: _install_docs
        redoc_url=None if docs_assets else "/redoc",
    )
    if docs_assets:
        _install_docs(app, docs_assets)
    else:  # an install without the [serve] extra's fastapi-offline: FastAPI's CDN pages, said once
        logger.warning("fastapi-offline is not installed: /docs and /redoc load Swagger UI and ReDoc from a CDN")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.engine = engine
    app.state.retrieval = retrieval
    app.state.text = text
    install_error_handlers(app)
    app.include_router(inference.router)
    app.include_router(ops.router)
    app.include_router(search.router)
    app.include_router(openai_compat.router)  # protocol adapters over the same pipeline (issue 15)
    app.include_router(kserve.router)
    app.include_router(analyze.router)
    if settings.ui_enabled:
        app.include_router(ui.router)
    for router in routers:
        app.include_router(router)
    app.add_middleware(
        ServiceMiddleware,
        metrics=metrics,
        policy=ApiKeyPolicy((k.get_secret_value() for k in settings.api_keys), settings.auth_scope),
        max_body_bytes=settings.max_body_bytes,
        admission=engine.admission,
        draining=lambda: engine.status in ("draining", "stopped"),
    )
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def create_app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory service.main:create_app_from_env` and multi-worker serving: settings from
    the AIM_* environment. /info "worker" says which process answered (several workers share one port)."""
    settings = Settings()
    if not logging.getLogger().handlers:  # a spawned worker does not inherit the entry point's logging setup
        logging.basicConfig(
            level=settings.log_level.upper(), format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
        )
    app = create_app(settings)
    app.state.engine.describers["worker"] = lambda: {
        "pid": os.getpid(),
        "workers": settings.workers,
        "metrics": "merged over workers" if app.state.metrics.multiprocess_dir else "this process",
    }
    return app
