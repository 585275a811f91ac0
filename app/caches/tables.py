from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, utcnow


class DescriptionCacheEntry(Base):
    """LLM answers by the key ``lafter.descriptions`` computes (it covers model, question, class)."""

    __tablename__ = "description_cache"

    key: Mapped[str] = mapped_column(String(512), primary_key=True)
    answers: Mapped[list[Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TextEmbeddingCacheEntry(Base):
    """One sentence's embedding under one text encoder: keyed by (model, sentence), never by less."""

    __tablename__ = "text_embedding_cache"

    model_key: Mapped[str] = mapped_column(String(512), primary_key=True)
    sentence_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    sentence: Mapped[str] = mapped_column(Text)
    dim: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32, little-endian
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
