"""Cursor pagination: ``{data, has_more, next_cursor}``. Ids are time-ordered, so the cursor is
the last id returned; the newest item comes first."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel
from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.core.settings import get_settings

T = TypeVar("T", bound=BaseModel)
R = TypeVar("R")


class Page(BaseModel, Generic[T]):
    data: list[T]
    has_more: bool
    next_cursor: str | None = None


class PageParams(BaseModel):
    after: str | None = None
    limit: int = 20


def page_params(
    after: str | None = Query(None, description="cursor: the next_cursor of the previous page"),
    limit: int | None = Query(None, ge=1, description="page size (capped by the server)"),
) -> PageParams:
    settings = get_settings()
    size = min(limit or settings.page_size_default, settings.page_size_max)
    return PageParams(after=after, limit=size)


def paginate(
    session: Session, stmt: Select[Any], id_column: InstrumentedAttribute[str], params: PageParams
) -> tuple[Sequence[Any], bool, str | None]:
    """Newest first, keyset on the id. Returns (rows, has_more, next_cursor)."""
    if params.after:
        stmt = stmt.where(id_column < params.after)
    rows = list(session.scalars(stmt.order_by(id_column.desc()).limit(params.limit + 1)))
    has_more = len(rows) > params.limit
    rows = rows[: params.limit]
    cursor = getattr(rows[-1], id_column.key) if has_more and rows else None
    return rows, has_more, cursor
