"""The Celery application: ``celery -A worker.celery_app worker --pool=solo -Q gpu``.

Configured for long GPU jobs in ``app.core.broker.make_celery``: late acks, rejected (requeued) on
worker loss, prefetch 1, a broker visibility timeout longer than the longest job, one ``gpu`` queue.
"""

from __future__ import annotations

import logging

from celery.signals import worker_process_init, worker_ready, worker_shutdown, worker_shutting_down

from app.core.broker import make_celery
from app.core.settings import get_settings

settings = get_settings()
app = make_celery(settings)


@worker_process_init.connect
def _init_process(**_kwargs: object) -> None:
    _configure()


def _configure() -> None:
    import torch

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    logging.getLogger("lafter").setLevel(settings.log_level)
    logging.getLogger("worker").setLevel(settings.log_level)


_configure()

import worker.tasks  # noqa: E402,F401  (registers the task on ``app``)
from worker.pipeline import request_shutdown  # noqa: E402
from worker.webhooks import WebhookSender  # noqa: E402

# SIGTERM or SIGINT (a warm shutdown): the running job stops before its next step, with a
# checkpoint, and is queued again, instead of the worker waiting for it to finish.
worker_shutting_down.connect(request_shutdown, weak=False)


# Webhooks are sent from the worker side, never from the API: a thread beside the jobs
# (worker/webhooks.py says why not a task). The process's one sender, kept to stop it.
_senders: list[WebhookSender] = []


@worker_ready.connect
def _start_webhook_sender(**_kwargs: object) -> None:
    from app.core.db import get_sessionmaker

    _senders.append(WebhookSender(settings, get_sessionmaker()).start())


@worker_shutdown.connect
def _stop_webhook_sender(**_kwargs: object) -> None:
    while _senders:
        _senders.pop().stop(timeout_s=settings.webhook_timeout_s + 5)
