"""The Celery settings made for long GPU jobs."""

from __future__ import annotations

from pathlib import Path

from app.core.broker import RUN_JOB_TASK, make_celery
from app.core.settings import Settings


def test_long_gpu_job_settings(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        broker_url="redis://127.0.0.1:6379/13",
        job_time_limit_s=3600,
        broker_visibility_timeout_s=7200,
        _env_file=None,  # type: ignore[call-arg]
    )
    conf = make_celery(settings).conf
    assert conf.task_acks_late is True and conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_concurrency == 1
    assert conf.broker_transport_options["visibility_timeout"] == 7200 > conf.task_soft_time_limit == 3600
    assert conf.task_routes[RUN_JOB_TASK] == {"queue": "gpu"} and conf.task_default_queue == "gpu"
    assert conf.task_ignore_result is True  # the job row is the truth


def test_embedded_broker_needs_no_server(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, _env_file=None)  # type: ignore[call-arg]
    options = make_celery(settings).conf.broker_transport_options
    assert settings.broker_url == "filesystem://"
    assert (
        Path(options["data_folder_in"]).is_dir() and options["data_folder_in"] == options["data_folder_out"]
    )
