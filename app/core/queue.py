"""Enqueueing jobs. Called by routers only after the job row is committed, so a worker never
receives an id whose row it cannot see. The API sends by task name and never imports the
worker's pipeline (or torch training code)."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from app.core.settings import Settings, get_settings

RUN_JOB_TASK = "lafter.run_job"


def broker_transport_options(settings: Settings) -> dict[str, object]:
    options: dict[str, object] = {"visibility_timeout": settings.broker_visibility_timeout_s}
    if settings.broker_url.startswith("filesystem"):
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        options.update(
            data_folder_in=str(folder / "queue"),
            data_folder_out=str(folder / "queue"),
            data_folder_processed=str(folder / "processed"),
            # kombu's default is ./control, relative to whatever directory the process started in
            control_folder=str(folder / "control"),
            store_processed=False,
            polling_interval=0.5,
        )
    return options


def make_celery(settings: Settings) -> Celery:
    app = Celery("lafter", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,  # the job row is the truth, not a result backend
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.gpu_queue,
        task_routes={RUN_JOB_TASK: {"queue": settings.gpu_queue}},
        # Long GPU jobs: ack only when done, requeue if the worker dies, one job in hand at a time.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,  # one job per worker process: a GPU runs one adaptation at a time
        worker_max_tasks_per_child=None,
        task_time_limit=settings.job_time_limit_s + 300,
        task_soft_time_limit=settings.job_time_limit_s,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


@lru_cache(maxsize=1)
def get_celery() -> Celery:
    return make_celery(get_settings())


def enqueue_job(job_id: str) -> None:
    get_celery().send_task(RUN_JOB_TASK, args=[job_id], queue=get_settings().gpu_queue)


def check_broker(timeout: float = 3.0) -> None:
    with get_celery().connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)
