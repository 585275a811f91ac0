from __future__ import annotations

import hmac
import logging
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.core.broker import check_broker
from app.core.db import get_engine
from app.core.errors import problem
from app.core.metrics import REGISTRY
from app.core.settings import Settings, get_settings
from app.core.storage import get_storage

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up (no dependencies checked)."""
    return {"status": "ok"}


def _checks() -> dict[str, str]:
    results: dict[str, str] = {}
    for name, check in (
        ("database", lambda: _db()),
        ("broker", lambda: check_broker()),
        ("storage", lambda: get_storage().check()),
    ):
        try:
            check()
            results[name] = "ok"
        except Exception as exc:
            log.warning("readiness check %s failed: %s", name, exc)
            results[name] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
    return results


def _db() -> None:
    with get_engine().connect() as conn:
        conn.execute(text("SELECT 1"))


@router.get("/readyz", response_model=None)
async def readyz() -> Any:
    """Database, broker and blob storage reachable."""
    results = await run_in_threadpool(_checks)
    if all(v == "ok" for v in results.values()):
        return {"status": "ok", "checks": results}
    failed = ", ".join(k for k, v in results.items() if v != "ok")
    return problem(503, "not_ready", f"not ready: {failed}", extra={"checks": results})


@router.get("/metrics", include_in_schema=False, response_model=None)
async def metrics(request: Request, settings: Settings = Depends(get_settings)) -> Response:
    """Prometheus metrics, every owner's job counts among them: open in development and the
    embedded mode; in production only with ``LAFTER_METRICS_TOKEN`` (as a Bearer token), else off."""
    access = settings.metrics_access
    if access == "off":
        return problem(
            404,
            "metrics_off",
            "/metrics is off in production; set LAFTER_METRICS_TOKEN and scrape with "
            "'Authorization: Bearer <token>'",
            title="Not found",
        )
    if access == "token":
        assert settings.metrics_token is not None
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        expected = settings.metrics_token.get_secret_value().encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            return problem(
                401,
                "metrics_token_invalid",
                "/metrics needs 'Authorization: Bearer <LAFTER_METRICS_TOKEN>'",
                title="Unauthorized",
                headers={"WWW-Authenticate": "Bearer"},
            )
    body = await run_in_threadpool(generate_latest, REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
