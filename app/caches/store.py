"""Database-backed caches for the worker: LLM descriptions and text embeddings, so a second job
with the same classes (and model) recomputes nothing. Both count hits and misses, which the job
reports in its metrics."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from app.caches.tables import DescriptionCacheEntry, TextEmbeddingCacheEntry

_CHUNK = 500


def _insert(session: Session, table: type[object]):  # type: ignore[no-untyped-def]
    dialect = session.get_bind().dialect.name
    module = postgresql if dialect == "postgresql" else sqlite
    return module.insert(table)  # type: ignore[arg-type]


class DbDescriptionCache:
    """``lafter.llm.DescriptionCache`` over the ``description_cache`` table."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> list[str] | None:
        with self.sessions() as session:
            answers = session.scalar(
                select(DescriptionCacheEntry.answers).where(DescriptionCacheEntry.key == key)
            )
        if answers is None:
            self.misses += 1
            return None
        self.hits += 1
        return [str(a) for a in answers]

    def put(self, key: str, answers: list[str]) -> None:
        with self.sessions() as session:
            stmt = _insert(session, DescriptionCacheEntry).values(key=key, answers=list(answers))
            session.execute(stmt.on_conflict_do_nothing(index_elements=["key"]))
            session.commit()


def sentence_digest(sentence: str) -> str:
    return hashlib.sha256(sentence.encode("utf-8")).hexdigest()


class DbEmbeddingCache:
    """``lafter.text_cache.EmbeddingCache`` over ``text_embedding_cache``: float32 bytes keyed by
    (model key, SHA-256 of the sentence)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self.hits = 0
        self.misses = 0

    def get_many(self, model_key: str, sentences: list[str]) -> dict[str, torch.Tensor]:
        by_digest = {sentence_digest(s): s for s in dict.fromkeys(sentences)}
        found: dict[str, torch.Tensor] = {}
        digests = list(by_digest)
        with self.sessions() as session:
            for start in range(0, len(digests), _CHUNK):
                chunk = digests[start : start + _CHUNK]
                rows = session.execute(
                    select(TextEmbeddingCacheEntry.sentence_sha256, TextEmbeddingCacheEntry.vector).where(
                        TextEmbeddingCacheEntry.model_key == model_key,
                        TextEmbeddingCacheEntry.sentence_sha256.in_(chunk),
                    )
                )
                for digest, vector in rows:
                    found[by_digest[digest]] = torch.from_numpy(np.frombuffer(vector, dtype="<f4").copy())
        self.hits += len(found)
        self.misses += len(by_digest) - len(found)
        return found

    def put_many(self, model_key: str, items: dict[str, torch.Tensor]) -> None:
        rows = [
            {
                "model_key": model_key,
                "sentence_sha256": sentence_digest(s),
                "sentence": s,
                "dim": int(v.numel()),
                "vector": v.detach().float().cpu().numpy().astype("<f4").tobytes(),
            }
            for s, v in items.items()
        ]
        if not rows:
            return
        with self.sessions() as session:
            for start in range(0, len(rows), _CHUNK):
                stmt = _insert(session, TextEmbeddingCacheEntry).values(rows[start : start + _CHUNK])
                session.execute(stmt.on_conflict_do_nothing(index_elements=["model_key", "sentence_sha256"]))
            session.commit()
