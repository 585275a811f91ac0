from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.core.db import get_engine
from app.core.errors import problem
from app.core.metrics import REGISTRY
from app.core.queue import check_broker
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


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    body = await run_in_threadpool(generate_latest, REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
