from __future__ import annotations

from typing import Any

from sqlalchemy import Select, delete, select
from sqlalchemy.orm import Session

from app.models.tables import Model, ModelArtifact


def get(session: Session, owner_id: str, model_id: str) -> Model | None:
    return session.scalar(select(Model).where(Model.id == model_id, Model.owner_id == owner_id))


def list_query(owner_id: str) -> Select[Any]:
    return select(Model).where(Model.owner_id == owner_id)


def artifact_bytes(session: Session, model_id: str) -> bytes | None:
    return session.scalar(select(ModelArtifact.data).where(ModelArtifact.model_id == model_id))


def delete_model(session: Session, model_id: str) -> None:
    session.execute(delete(ModelArtifact).where(ModelArtifact.model_id == model_id))
    session.execute(delete(Model).where(Model.id == model_id))
