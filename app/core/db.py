"""Engine, sessions and the declarative base.

The request (or the task) owns the transaction: services add and flush, the router or task commits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, ClassVar

from sqlalchemy import JSON, DateTime, Engine, MetaData, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from app.core.settings import get_settings

log = logging.getLogger(__name__)

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on Postgres and SQLite alike (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
    }


def utcnow() -> datetime:
    return datetime.now(UTC)


def make_engine(url: str, *, connect_timeout_s: int = 5, pool_timeout_s: float = 10.0) -> Engine:
    """One engine per process. Postgres: connections are pinged before use (a pool that outlived a
    database restart reconnects instead of failing the request), a connection attempt gives up after
    ``connect_timeout_s``, and waiting for a pooled connection after ``pool_timeout_s``; the API
    answers either with 503 ``database_unavailable`` (see ``app.core.errors``)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the API read while the embedded worker writes; FKs are off by default.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    connect_args: dict[str, Any] = {}
    if url.startswith("postgresql"):
        connect_args["connect_timeout"] = connect_timeout_s
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=10,
        pool_timeout=pool_timeout_s,
        connect_args=connect_args,
    )


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    settings = get_settings()
    return make_engine(
        settings.database_url,
        connect_timeout_s=settings.db_connect_timeout_s,
        pool_timeout_s=settings.db_pool_timeout_s,
    )


@lru_cache(maxsize=1)
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


def get_session() -> Iterator[Session]:
    """FastAPI dependency: one session per request; uncommitted work is rolled back at the end."""
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        try:
            session.close()
        except DBAPIError as exc:
            # The database went away with this request's transaction open (this runs after the
            # response went out): nothing is left to roll back and the pool has dropped the
            # connection. Raising here would only break the client's keep-alive connection.
            if not exc.connection_invalidated:
                raise
            log.warning("database connection lost while closing a session: %s", exc.orig)


# --- work that must wait for the commit ------------------------------------------------------

_AFTER_COMMIT = "lafter_after_commit"


def after_commit(session: Session, action: Callable[[], None]) -> None:
    """Run ``action`` once the session's transaction commits, and never if it rolls back: so a
    service can ask for broker work (send a job, signal a cancel) and still leave the commit to its
    caller, and no worker gets an id whose row it cannot see. A failing action is logged; the
    reaper repairs whatever it left undone."""
    if not event.contains(session, "after_commit", _run_after_commit):
        event.listen(session, "after_commit", _run_after_commit)
        event.listen(session, "after_rollback", _drop_after_commit)
    session.info.setdefault(_AFTER_COMMIT, []).append(action)


def _run_after_commit(session: Session) -> None:
    for action in session.info.pop(_AFTER_COMMIT, []):
        try:
            action()
        except Exception:
            log.warning("post-commit action %r failed", action, exc_info=True)


def _drop_after_commit(session: Session) -> None:
    session.info.pop(_AFTER_COMMIT, None)
