"""The migrations are the only way the schema is made: they must match the models and reverse."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from alembic import command

from app.core.migrate import alembic_config
from tests.service.helpers import scratch_database


@pytest.fixture
def empty_postgres() -> Iterator[str]:
    with scratch_database("lafter_migr") as url:
        yield url


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_upgrade_matches_models_and_downgrades(backend: str, empty_postgres: str, tmp_path: object) -> None:
    url = empty_postgres if backend == "postgres" else f"sqlite:///{tmp_path}/m.db"
    cfg = alembic_config(url)
    command.upgrade(cfg, "head")
    command.check(cfg)  # raises if the models have changes no migration describes
    command.downgrade(cfg, "base")
    command.upgrade(cfg, "head")


# A job row as the API wrote it before 0003: every column then required, the old hyperparameters.
OLD_JOB = {
    "id": "job_old", "owner_id": "o", "status": "queued", "base_model": "ViT-B-32::openai",
    "class_names": '["cat", "dog"]', "descriptions": "{}", "seed": 1, "metadata": "{}",
    "hyperparameters": '{"epochs": "auto", "batch_size": "auto", "prompt_tokens": 50, '
    '"pseudo_label_balance": "none", "text_steps": "auto"}',
    "percent": 0.0, "stage_percent": 0.0, "step": 0, "total_steps": 0, "metrics": "{}",
    "warnings": "[]", "attempts": 0, "created_at": "2026-01-01 00:00:00+00:00",
    "updated_at": "2026-01-01 00:00:00+00:00",
}  # fmt: skip


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_jobs_from_before_the_recipe_column_read_paper(
    backend: str, empty_postgres: str, tmp_path: object
) -> None:
    import sqlalchemy as sa

    from app.core.db import make_engine
    from app.jobs.schemas import to_configs

    url = empty_postgres if backend == "postgres" else f"sqlite:///{tmp_path}/m.db"
    cfg = alembic_config(url)
    command.upgrade(cfg, "0002")
    engine = make_engine(url)
    try:
        columns = ", ".join(OLD_JOB)
        values = ", ".join(f":{k}" for k in OLD_JOB)
        with engine.begin() as conn:
            conn.execute(sa.text(f"INSERT INTO jobs ({columns}) VALUES ({values})"), OLD_JOB)
        command.upgrade(cfg, "head")
        with engine.connect() as conn:
            recipe, hp = conn.execute(sa.text("SELECT recipe, hyperparameters FROM jobs")).one()
    finally:
        engine.dispose()
    assert recipe == "paper"
    # ... and the worker runs it as it was asked then: the paper recipe, its explicit values kept.
    _, adapt = to_configs(hp if isinstance(hp, dict) else json.loads(hp), recipe)
    assert adapt.recipe == "paper" and adapt.prompt_tokens == 50 and adapt.pseudo_label_balance == "none"
