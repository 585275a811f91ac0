"""The migrations are the only way the schema is made: they must match the models and reverse."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from alembic import command

from app.core.migrate import alembic_config
from tests.service.conftest import ADMIN_URL


@pytest.fixture
def empty_postgres() -> Iterator[str]:
    name = f"lafter_migr_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_upgrade_matches_models_and_downgrades(backend: str, empty_postgres: str, tmp_path: object) -> None:
    url = empty_postgres if backend == "postgres" else f"sqlite:///{tmp_path}/m.db"
    cfg = alembic_config(url)
    command.upgrade(cfg, "head")
    command.check(cfg)  # raises if the models have changes no migration describes
    command.downgrade(cfg, "base")
    command.upgrade(cfg, "head")
