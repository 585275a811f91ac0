"""The FastAPI application: ``uvicorn app.main:app`` (or ``python -m app`` for the embedded mode)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.base_models.router import router as base_models_router
from app.core.errors import install_error_handlers
from app.core.limits import BodyLimitMiddleware
from app.core.metrics import HTTP_LATENCY, HTTP_REQUESTS
from app.core.settings import Settings, get_settings
from app.datasets.router import router as datasets_router
from app.health.router import router as health_router
from app.jobs.router import router as jobs_router
from app.models.router import router as models_router

log = logging.getLogger("app")


def _route_name(app: FastAPI, scope: Scope) -> str:
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return str(getattr(route, "path", "unknown"))
    return "unmatched"


class MetricsMiddleware:
    """Request count and latency by route template (pure ASGI: it never touches the body stream)."""

    def __init__(self, app: ASGIApp, route_of: Callable[[Scope], str]) -> None:
        self.app = app
        self.route_of = route_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = self.route_of(scope)
            HTTP_REQUESTS.labels(scope["method"], route, str(status)).inc()
            HTTP_LATENCY.labels(scope["method"], route).observe(time.perf_counter() - start)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        log.warning(
            "auth: single-user mode, every request acts as owner %r (API keys come with the next release)",
            settings.default_owner_id,
        )
        log.info(
            "database %s, broker %s, storage %s",
            settings.database_url.split("@")[-1],
            settings.broker_url.split("@")[-1],
            settings.storage_backend,
        )
        yield

    app = FastAPI(
        title="LaFTer adaptation service",
        version="0.1.0",
        description="Adapt a CLIP classifier to your own unlabeled images (LaFTer), then classify.",
        lifespan=lifespan,
    )
    install_error_handlers(app)

    app.add_middleware(MetricsMiddleware, route_of=lambda scope: _route_name(app, scope))
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    for router in (health_router, datasets_router, jobs_router, models_router, base_models_router):
        app.include_router(router)
    return app


app = create_app()
