"""The FastAPI application: ``uvicorn app.main:app`` (or ``python -m app`` for the embedded mode)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.base_models.router import router as base_models_router
from app.console.router import router as console_router
from app.core.auth import KeyFirst, current_owner
from app.core.errors import install_error_handlers, problem
from app.core.limits import BodyLimitMiddleware
from app.core.metrics import HTTP_LATENCY, HTTP_REQUESTS
from app.core.settings import Settings, get_settings
from app.datasets.router import router as datasets_router
from app.health.router import router as health_router
from app.jobs.router import router as jobs_router
from app.models.router import router as models_router
from app.webhooks.router import router as webhooks_router

log = logging.getLogger("app")


def _flat_routes(routes: Sequence[BaseRoute]) -> list[BaseRoute]:
    """The routes of an app with included routers opened up (FastAPI keeps an included router as one
    entry whose ``original_router`` holds its routes; ours are included without a prefix)."""
    out: list[BaseRoute] = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        out.extend(_flat_routes(inner.routes) if inner is not None else [route])
    return out


def _route_name(routes: Callable[[], list[BaseRoute]], scope: Scope) -> str:
    """The route template of a request (``/v1/jobs/{job_id}``), never its path: the one FastAPI
    resolved (``scope["route"]``) when the request reached a route. Only a request refused before
    routing (no key, too large, a NUL in the URL) is matched here, against ``routes()``; "unmatched"
    when none matches."""
    resolved = scope.get("route")
    if resolved is not None and isinstance(getattr(resolved, "path", None), str):
        return str(resolved.path)
    probe = {**scope, "fastapi": {}}  # matching may note things in the scope: not in the request's
    partial = None
    for route in routes():
        match, _ = route.matches(probe)
        path = getattr(route, "path", None)
        if match == Match.FULL and isinstance(path, str):
            return path
        if match == Match.PARTIAL and partial is None and isinstance(path, str):
            partial = path  # the path matches, the method does not (405)
    return partial or "unmatched"


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


class RejectNulInUrl:
    """A URL with a NUL character (``%00``) is refused with 400 before any route sees it: no id,
    cursor or name can hold one, and PostgreSQL refuses it in a query (a 500, found by fuzzing)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            query = bytes(scope.get("query_string", b""))
            if "\x00" in scope["path"] or b"\x00" in query or b"%00" in query:
                response = problem(
                    400,
                    "nul_in_url",
                    "the URL contains a NUL character (%00), which no id, cursor or name can hold",
                    title="Bad request",
                    instance=scope["path"].replace("\x00", "%00"),
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        _log_auth_mode(settings)
        log.info(
            "database %s, broker %s, storage %s",
            settings.database_url.split("@")[-1],
            settings.broker_url.split("@")[-1],
            settings.storage_backend,
        )
        # --- job reaper (app/jobs/reaper.py): lost workers, lost broker messages, per-owner caps ---
        from app.jobs.reaper import start_reaper

        reaper = start_reaper(settings)
        try:
            yield
        finally:
            reaper.stop()
        # --- end job reaper ---

    app = FastAPI(
        title="LaFTer adaptation service",
        version="0.1.0",
        description="Adapt a CLIP classifier to your own unlabeled images (LaFTer), then classify.",
        lifespan=lifespan,
    )
    install_error_handlers(app)

    # Outermost last: metrics, then the key (before any body is read), then the body limit.
    app.add_middleware(RejectNulInUrl)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(KeyFirst, settings=settings)
    flat: list[BaseRoute] = []  # the app's routes, opened up once (they are all added below)

    def routes() -> list[BaseRoute]:
        if not flat:
            flat.extend(_flat_routes(app.router.routes))
        return flat

    app.add_middleware(MetricsMiddleware, route_of=lambda scope: _route_name(routes, scope))
    # /healthz, /readyz: public; /metrics: open in development, LAFTER_METRICS_TOKEN or off in production
    app.include_router(health_router)
    app.include_router(console_router)  # /console: static files, public; they call /v1 with the user's key
    # Every /v1 request is authenticated by ``KeyFirst`` before its body is read; the dependency
    # hands its owner to the routes (and checks the key itself where the middleware is absent), even
    # to one that forgets to ask for the owner itself.
    for router in (datasets_router, jobs_router, models_router, base_models_router, webhooks_router):
        app.include_router(router, dependencies=[Depends(current_owner)])
    return app


def _log_auth_mode(settings: Settings) -> None:
    if settings.auth == "off":
        log.warning(
            "AUTH IS OFF: every request acts as owner %r and anyone who can reach this port can read, "
            "change and delete everything. Fine for one person on one machine; otherwise set "
            "LAFTER_AUTH=on and create keys with 'python -m app keys create --owner NAME'.",
            settings.default_owner_id,
        )
        return
    log.info("auth on: requests need 'Authorization: Bearer <api key>'")
    try:
        from app.core.db import get_sessionmaker
        from app.keys.service import any_active

        with get_sessionmaker()() as session:
            if not any_active(session):
                log.warning(
                    "auth is on but there are no API keys yet, so every /v1 request gets 401: "
                    "create one with 'python -m app keys create --owner NAME'"
                )
    except Exception as exc:  # a start-up hint only: the database may not be up yet
        log.info("could not count API keys at start: %s", type(exc).__name__)


app = create_app()
