from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Response, UploadFile, status
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.auth import Owner, current_owner
from app.core.db import get_session
from app.core.errors import NotFound
from app.core.pagination import Page, PageParams, page_params, paginate
from app.core.settings import Settings, get_settings
from app.core.storage import BlobStorage, BlobWrites, get_storage
from app.datasets import repository, service
from app.datasets.schemas import DatasetCreate, DatasetOut, UploadReport
from app.datasets.tables import Dataset

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetOut)
def create_dataset(
    body: DatasetCreate, owner: Owner = Depends(current_owner), session: Session = Depends(get_session)
) -> DatasetOut:
    ds = service.create(session, owner, body)
    session.commit()
    return service.to_out(ds)


@router.get("", response_model=Page[DatasetOut])
def list_datasets(
    params: PageParams = Depends(page_params),
    owner: Owner = Depends(current_owner),
    session: Session = Depends(get_session),
) -> Page[DatasetOut]:
    rows, has_more, cursor = paginate(session, repository.list_query(owner.id), Dataset.id, params)
    return Page[DatasetOut](data=[service.to_out(r) for r in rows], has_more=has_more, next_cursor=cursor)


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(
    dataset_id: str, owner: Owner = Depends(current_owner), session: Session = Depends(get_session)
) -> DatasetOut:
    return service.to_out(service.get(session, owner, dataset_id))


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_dataset(
    dataset_id: str,
    owner: Owner = Depends(current_owner),
    session: Session = Depends(get_session),
    storage: BlobStorage = Depends(get_storage),
) -> Response:
    keys = service.delete(session, owner, dataset_id)
    session.commit()
    # Blobs are shared by content across datasets: delete only those no row refers to any more.
    for key in repository.unreferenced_keys(session, keys):
        storage.delete(key)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{dataset_id}/images",
    response_model=UploadReport,
    responses={413: {"description": "over a size limit"}, 422: {"description": "no file was accepted"}},
    form_limits={"max_files": get_settings().max_files_per_request},
)
def upload_images(
    dataset_id: str,
    files: Annotated[list[UploadFile], File(description="images and/or .zip / .tar(.gz) archives")],
    split: Annotated[
        Literal["train", "eval"],
        Form(description="'eval': a labelled evaluation split (archive folders or `labels` name the class)"),
    ] = "train",
    labels: Annotated[
        str | None, Form(description="JSON object: file name or archive path -> class name (evaluation only)")
    ] = None,
    owner: Owner = Depends(current_owner),
    session: Session = Depends(get_session),
    storage: BlobStorage = Depends(get_storage),
    settings: Settings = Depends(get_settings),
) -> UploadReport:
    blobs = BlobWrites(storage)
    sources = [service.UploadSource(f.filename or "upload", f.file, f.size) for f in files]
    try:
        report = service.add_images(
            session,
            blobs,
            owner,
            dataset_id,
            sources,
            split=split,
            labels=service.parse_labels(labels),
            settings=settings,
        )
        session.commit()
    except IntegrityError:
        # SQLite takes no row locks: a delete that committed while this upload ran leaves its rows
        # pointing at no dataset, and the foreign key refuses them. The delete won.
        session.rollback()
        blobs.rollback()
        if repository.get(session, owner.id, dataset_id) is None:
            raise NotFound(f"dataset {dataset_id} not found", code="dataset_not_found") from None
        raise
    except BaseException:
        session.rollback()
        blobs.rollback()
        raise
    return report
