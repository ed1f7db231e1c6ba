"""FastAPI dependencies: the engine and settings live on `app.state` (one per app, no globals).

They are `async def` on purpose: FastAPI runs plain `def` dependencies in a worker thread, a thread hop per
dependency per request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.engine import Engine
from service.metrics import ServiceMetrics
from service.settings import Settings

__all__ = ["EngineDep", "MetricsDep", "SettingsDep"]


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
