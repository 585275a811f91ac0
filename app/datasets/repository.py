"""Queries for datasets and their images. Every read is scoped by owner."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

from sqlalchemy import Select, delete, select, update
from sqlalchemy.orm import Session

from app.datasets.tables import Dataset, DatasetImage


def get(
    session: Session, owner_id: str, dataset_id: str, *, lock: Literal["use", "delete"] | None = None
) -> Dataset | None:
    """The dataset, optionally row-locked until the transaction ends (PostgreSQL; SQLite has one
    writer and ignores it). ``"use"`` (``FOR KEY SHARE``): rows will refer to it (images, a job);
    uses never block each other, nor the counters' UPDATE. ``"delete"`` (``FOR UPDATE``): it is about
    to be deleted; waits for every use in progress, and a use that comes later waits for the delete,
    then finds no dataset. So an upload or a job racing a delete either ends before the delete looks
    at the dataset, or sees it gone: never a row pointing at a deleted dataset."""
    stmt = select(Dataset).where(Dataset.id == dataset_id, Dataset.owner_id == owner_id)
    if lock == "use":
        stmt = stmt.with_for_update(read=True, key_share=True)
    elif lock == "delete":
        stmt = stmt.with_for_update()
    return session.scalar(stmt)


def list_query(owner_id: str) -> Select[Any]:
    return select(Dataset).where(Dataset.owner_id == owner_id)


def images_by_sha(session: Session, dataset_id: str, shas: Iterable[str]) -> dict[str, DatasetImage]:
    wanted = list(set(shas))
    if not wanted:
        return {}
    rows = session.scalars(
        select(DatasetImage).where(DatasetImage.dataset_id == dataset_id, DatasetImage.sha256.in_(wanted))
    )
    return {row.sha256: row for row in rows}


def add_counts(session: Session, dataset_id: str, train: int, evaluation: int, nbytes: int) -> None:
    # Increment in SQL so that concurrent uploads to one dataset do not lose counts.
    session.execute(
        update(Dataset)
        .where(Dataset.id == dataset_id)
        .values(
            image_count=Dataset.image_count + train,
            eval_image_count=Dataset.eval_image_count + evaluation,
            total_bytes=Dataset.total_bytes + nbytes,
        )
    )


def train_images(session: Session, dataset_id: str) -> Sequence[DatasetImage]:
    """The training split in content order (SHA-256 of the bytes, unique in a dataset): the same
    images give the same order whatever order, or dataset, they were uploaded in."""
    return session.scalars(
        select(DatasetImage)
        .where(DatasetImage.dataset_id == dataset_id, DatasetImage.split == "train")
        .order_by(DatasetImage.sha256)
    ).all()


def eval_images(session: Session, dataset_id: str) -> Sequence[DatasetImage]:
    """The evaluation split in content order, as ``train_images``."""
    return session.scalars(
        select(DatasetImage)
        .where(DatasetImage.dataset_id == dataset_id, DatasetImage.split == "eval")
        .order_by(DatasetImage.sha256)
    ).all()


def storage_keys(session: Session, dataset_id: str) -> list[str]:
    return list(
        session.scalars(select(DatasetImage.storage_key).where(DatasetImage.dataset_id == dataset_id))
    )


def unreferenced_keys(session: Session, keys: Iterable[str]) -> list[str]:
    wanted = list(set(keys))
    if not wanted:
        return []
    used = set(
        session.scalars(
            select(DatasetImage.storage_key).where(DatasetImage.storage_key.in_(wanted)).distinct()
        )
    )
    return [key for key in wanted if key not in used]


def delete_dataset(session: Session, dataset_id: str) -> None:
    session.execute(delete(DatasetImage).where(DatasetImage.dataset_id == dataset_id))
    session.execute(delete(Dataset).where(Dataset.id == dataset_id))


def images_query(dataset_id: str, split: str | None = None) -> Select[Any]:
    stmt = select(DatasetImage).where(DatasetImage.dataset_id == dataset_id)
    if split is not None:
        stmt = stmt.where(DatasetImage.split == split)
    return stmt


def get_image(session: Session, owner_id: str, dataset_id: str, image_id: str) -> DatasetImage | None:
    return session.scalar(
        select(DatasetImage).where(
            DatasetImage.id == image_id,
            DatasetImage.dataset_id == dataset_id,
            DatasetImage.owner_id == owner_id,
        )
    )
