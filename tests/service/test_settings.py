from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.core.settings import Settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in [k for k in os.environ if k.startswith("LAFTER_")]:
        monkeypatch.delenv(key)


def test_embedded_defaults(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, _env_file=None)  # type: ignore[call-arg]
    assert s.database_url == f"sqlite:///{(tmp_path / 'lafter.db').resolve()}"
    assert s.broker_url == "filesystem://" and s.storage_backend == "local"
    assert s.blob_dir == tmp_path / "blobs"


def test_production_refuses_embedded_defaults(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="production needs PostgreSQL"):
        Settings(env="production", data_dir=tmp_path, _env_file=None)  # type: ignore[call-arg]
    ok = Settings(
        env="production",
        database_url="postgresql+psycopg://u@db/x",
        broker_url="redis://redis:6379/0",
        _env_file=None,  # type: ignore[call-arg]
    )
    assert not ok.is_sqlite


def test_visibility_timeout_must_outlast_the_longest_job() -> None:
    with pytest.raises(ValidationError, match="VISIBILITY_TIMEOUT"):
        Settings(job_time_limit_s=7200, broker_visibility_timeout_s=3600, _env_file=None)  # type: ignore[call-arg]


def test_local_model_dirs_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAFTER_LOCAL_MODEL_DIRS", "/models/a,/models/b")
    assert Settings(_env_file=None).local_model_dirs == [Path("/models/a"), Path("/models/b")]  # type: ignore[call-arg]
    monkeypatch.setenv("LAFTER_LOCAL_MODEL_DIRS", '["/m/c"]')
    assert Settings(_env_file=None).local_model_dirs == [Path("/m/c")]  # type: ignore[call-arg]
