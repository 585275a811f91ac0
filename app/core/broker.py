"""The broker: the Celery app, message markers, sending a job id, cancel signals. It knows nothing
of jobs beyond their ids (which job to send, and when, is ``app.jobs.dispatch``). The job row is the
truth; the broker only carries job ids, and anything it holds can be lost (a Redis restarted without
persistence) and is then re-sent from the rows.

- ``send_job`` leaves a *marker* in the broker ("a message for this job is waiting") and sends one
  message; the task removes the marker when it takes the message (``message_taken``). A
  job that should have a message but has no marker lost it with the broker, and the reaper sends
  it again (``app.jobs.reaper``). Markers live where the messages live, so they are lost together.
- Cancel signals: published on Redis, so a running job stops before its next step; workers also
  read the status from the database, the only way on the filesystem broker.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from celery import Celery

from app.core.settings import Settings, get_settings

log = logging.getLogger(__name__)

RUN_JOB_TASK = "lafter.run_job"
MARKER_PREFIX = "lafter:sent:"
CANCEL_CHANNEL_PREFIX = "lafter:cancel:"


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


# Celery apps by broker (a cache, and says so): the API and the worker use their process's
# settings; code that is handed other settings (tests running the pipeline in-process) gets its own.
_APPS: dict[tuple[str, str, str], Celery] = {}
_APPS_LOCK = threading.Lock()


def celery_for(settings: Settings) -> Celery:
    key = (settings.broker_url, str(settings.broker_dir), settings.gpu_queue)
    with _APPS_LOCK:
        if key not in _APPS:
            _APPS[key] = make_celery(settings)
        return _APPS[key]


def get_celery() -> Celery:
    return celery_for(get_settings())


# --- markers: does the broker still hold a job's message? ---------------------------------------


class Markers(Protocol):
    def mark(self, job_id: str) -> None: ...
    def forget(self, job_id: str) -> None: ...
    def present(self, job_ids: Sequence[str]) -> set[str]: ...


class RedisMarkers:
    """Keys in the broker's Redis database: a Redis restarted without persistence loses them with
    the messages. They expire long after any message could still be waiting (hygiene only)."""

    def __init__(self, client: Any, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s

    def mark(self, job_id: str) -> None:
        self.client.set(MARKER_PREFIX + job_id, "1", ex=self.ttl_s)

    def forget(self, job_id: str) -> None:
        self.client.delete(MARKER_PREFIX + job_id)

    def present(self, job_ids: Sequence[str]) -> set[str]:
        if not job_ids:
            return set()
        values = self.client.mget([MARKER_PREFIX + j for j in job_ids])
        return {j for j, v in zip(job_ids, values, strict=True) if v is not None}


class FileMarkers:
    """Files beside the filesystem broker's messages (the embedded mode)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def mark(self, job_id: str) -> None:
        (self.folder / job_id).touch()

    def forget(self, job_id: str) -> None:
        (self.folder / job_id).unlink(missing_ok=True)

    def present(self, job_ids: Sequence[str]) -> set[str]:
        return {j for j in job_ids if (self.folder / j).exists()}


class AssumeDelivered:
    """A broker we cannot look into: every sent message is taken to be there, and only the
    ``LAFTER_REQUEUE_AFTER_S`` rule re-sends."""

    def mark(self, job_id: str) -> None:
        return None

    def forget(self, job_id: str) -> None:
        return None

    def present(self, job_ids: Sequence[str]) -> set[str]:
        return set(job_ids)


def _is_redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://"))


@lru_cache(maxsize=4)
def _redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3, health_check_interval=30)


def broker_redis(settings: Settings | None = None) -> Any | None:
    """A client of the broker's Redis database, or None when the broker is not Redis."""
    url = (settings or get_settings()).broker_url
    return _redis_client(url) if _is_redis(url) else None


@lru_cache(maxsize=4)
def _markers(broker_url: str, broker_dir: str, ttl_s: int) -> Markers:
    if _is_redis(broker_url):
        return RedisMarkers(_redis_client(broker_url), ttl_s=ttl_s)
    if broker_url.startswith("filesystem"):
        return FileMarkers(Path(broker_dir) / "sent")
    return AssumeDelivered()


def markers(settings: Settings | None = None) -> Markers:
    settings = settings or get_settings()
    return _markers(settings.broker_url, str(settings.broker_dir), 2 * settings.broker_visibility_timeout_s)


def send_job(job_id: str, settings: Settings | None = None) -> None:
    """A marker, then one message for ``job_id``. The marker comes first because an idle worker
    can take the message (and clear the marker) before ``send_task`` returns: marking afterwards
    would leave a marker for a message that is gone, and a job that then waits for a slot would not
    be sent again. The caller has committed the row (and stamped ``enqueued_at``): a worker must
    never get an id whose row it cannot see."""
    settings = settings or get_settings()
    sent = markers(settings)
    sent.mark(job_id)
    try:
        celery_for(settings).send_task(RUN_JOB_TASK, args=[job_id], queue=settings.gpu_queue)
    except BaseException:
        with contextlib.suppress(Exception):
            sent.forget(job_id)  # nothing was sent: let the reaper see that
        raise


def message_taken(job_id: str) -> None:
    """The worker took this job's message out of the broker (called first thing by the task)."""
    try:
        markers().forget(job_id)
    except Exception:  # the reaper may then send a duplicate, which the task ignores
        log.warning("could not clear the message marker of job %s", job_id, exc_info=True)


def check_broker(timeout: float = 3.0) -> None:
    with get_celery().connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)


# --- cancel signals -------------------------------------------------------------------------------


def signal_cancel(job_id: str) -> None:
    """Tell the worker running ``job_id`` at once (Redis pub/sub). Best effort: the worker also
    reads the job's status every ``LAFTER_CANCEL_POLL_INTERVAL_S``."""
    client = broker_redis()
    if client is None:
        return
    try:
        client.publish(CANCEL_CHANNEL_PREFIX + job_id, "cancel")
    except Exception:
        log.warning("could not signal the cancel of job %s; its worker reads it from the database", job_id)


class CancelSignals:
    """A worker's subscription to one job's cancel signal. ``wait`` blocks up to ``timeout`` seconds
    (or until ``stop`` is set) and says whether a signal arrived. Without Redis it only waits."""

    def __init__(self, job_id: str, redis_url: str) -> None:
        self.channel = CANCEL_CHANNEL_PREFIX + job_id
        self._pubsub: Any = None
        if _is_redis(redis_url):
            try:
                import redis

                client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=3)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                self._pubsub = pubsub
            except Exception:
                log.warning("no cancel signals for %s (Redis unreachable); polling the database", job_id)

    def wait(self, timeout: float, stop: Any) -> bool:
        deadline = time.monotonic() + max(0.0, timeout)
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            slice_s = min(remaining, 0.2)  # stays responsive to ``stop``
            if self._pubsub is None:
                stop.wait(slice_s)
                continue
            try:
                if self._pubsub.get_message(timeout=slice_s) is not None:
                    return True
            except Exception:
                log.warning("cancel signals lost (%s); polling the database", self.channel, exc_info=True)
                self.close()
        return False

    def close(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                self._pubsub.close()
            self._pubsub = None
