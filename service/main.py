"""`create_app(settings)`: the FastAPI application and its lifespan.

Lifespan: the engine starts loading in the background (so /healthz answers at once and /readyz says "loading"),
warms the backend up at the largest batch, checks its outputs against golden reference outputs, opens the vector
index (when `index_path` is set) for the served model's recipe, and only then turns ready. Shutdown stops the
batcher after the server has finished its in-flight requests, frees the backend, then snapshots and closes the
index. SIGTERM handling (readiness first, then drain) lives in `service.server`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi

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
from service.schemas import ClassifyRequest, EmbedRequest
from service.search_schemas import AddItemsRequest, SearchRequest
from service.settings import Settings
from service.text import TextService

__all__ = ["create_app", "create_app_from_env"]

logger = logging.getLogger(__name__)

API_VERSION = "1.0.0"


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated spec plus the JSON request models the routes parse by hand (they accept multipart too)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
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

    app = FastAPI(
        title="AIM service",
        version=API_VERSION,
        description="Embeddings and classification from Apple's AIM v1 image models, with dynamic batching.",
        lifespan=lifespan,
    )
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
