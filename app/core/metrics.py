"""Prometheus metrics of the API process. Job counts by status are read from the database at
scrape time (the job row is the truth), so they are right whichever process changed them."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

HTTP_REQUESTS = Counter(
    "lafter_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=REGISTRY
)
HTTP_LATENCY = Histogram(
    "lafter_http_request_seconds", "HTTP request latency", ["method", "route"], registry=REGISTRY
)
UPLOADED_FILES = Counter(
    "lafter_uploaded_files_total", "Uploaded images by outcome", ["outcome"], registry=REGISTRY
)
JOBS_CREATED = Counter("lafter_jobs_created_total", "Jobs accepted and queued", registry=REGISTRY)
CLASSIFIED_IMAGES = Counter(
    "lafter_classified_images_total", "Images classified", ["kind"], registry=REGISTRY
)
MODEL_LOADS = Counter(
    "lafter_model_loads_total", "Base model loads and adapted delta loads", ["what"], registry=REGISTRY
)


class JobStatusCollector(Collector):
    def describe(self) -> Iterable[Metric]:
        # Registering must not touch the database (it may not exist yet).
        yield GaugeMetricFamily("lafter_jobs", "Jobs by status", labels=["status"])

    def collect(self) -> Iterable[Metric]:
        from app.core.db import get_sessionmaker
        from app.jobs import repository

        gauge = GaugeMetricFamily("lafter_jobs", "Jobs by status", labels=["status"])
        try:
            with get_sessionmaker()() as session:
                for status, count in repository.count_by_status(session).items():
                    gauge.add_metric([status], float(count))
        except Exception:  # a scrape must not fail because the database blinked
            log.warning("could not count jobs for /metrics", exc_info=True)
        yield gauge


REGISTRY.register(JobStatusCollector())
