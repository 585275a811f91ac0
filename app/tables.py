"""Every ORM table, imported in one place so Alembic and tests see the whole schema."""

from app.caches.tables import DescriptionCacheEntry, TextEmbeddingCacheEntry
from app.core.db import Base
from app.datasets.tables import Dataset, DatasetImage
from app.jobs.tables import Job, JobEvent
from app.keys.tables import ApiKey
from app.models.tables import Model, ModelArtifact
from app.webhooks.tables import WebhookMessage, WebhookSecret

__all__ = [
    "ApiKey",
    "Base",
    "Dataset",
    "DatasetImage",
    "DescriptionCacheEntry",
    "Job",
    "JobEvent",
    "Model",
    "ModelArtifact",
    "TextEmbeddingCacheEntry",
    "WebhookMessage",
    "WebhookSecret",
]
