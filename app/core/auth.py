"""Who is calling. Every dataset, job and model row carries ``owner_id``; routers get it from
``current_owner`` only, so replacing this one dependency with API-key auth (keys stored hashed,
``Authorization: Bearer``) changes no router or service."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends

from app.core.settings import Settings, get_settings


@dataclass(frozen=True)
class Owner:
    id: str


def current_owner(settings: Settings = Depends(get_settings)) -> Owner:
    # Single-user mode: everything belongs to the configured default owner (logged at startup).
    return Owner(id=settings.default_owner_id)
