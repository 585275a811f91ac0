from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Header, Query, Response, UploadFile, status
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.auth import Owner, current_owner
from app.core.db import get_session
from app.core.errors import NotFound
from app.core.pagination import Page, PageParams, page_params, paginate
from app.core.settings import Settings, get_settings
from app.core.storage import BlobNotFound, BlobStorage, BlobWrites, get_storage
from app.datasets import repository, service
from app.datasets.images import thumbnail_jpeg
from app.datasets.schemas import DatasetCreate, DatasetImageOut, DatasetOut, UploadReport
from app.datasets.tables import Dataset, DatasetImage

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


@router.get("/{dataset_id}/images", response_model=Page[DatasetImageOut])
def list_images(
    dataset_id: str,
    split: Literal["train", "eval"] | None = Query(None, description="only this split"),
    params: PageParams = Depends(page_params),
    owner: Owner = Depends(current_owner),
    session: Session = Depends(get_session),
) -> Page[DatasetImageOut]:
    ds = service.get(session, owner, dataset_id)
    rows, has_more, cursor = paginate(session, repository.images_query(ds.id, split), DatasetImage.id, params)
    return Page[DatasetImageOut](
        data=[service.image_out(r) for r in rows], has_more=has_more, next_cursor=cursor
    )


# An image id names fixed bytes (images are never edited, only deleted), so a thumbnail may be kept
# a day; private (it is one owner's), and revalidated cheaply by its ETag after that.
THUMBNAIL_CACHE = "private, max-age=86400"


@router.get(
    "/{dataset_id}/images/{image_id}/thumbnail",
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {}}, "description": "a JPEG, its longer side at most `size`"},
        304: {"description": "If-None-Match matched: the thumbnail the client holds is current"},
    },
)
def image_thumbnail(
    dataset_id: str,
    image_id: str,
    size: int = Query(256, ge=16, le=512, description="longest side in pixels (never enlarged)"),
    if_none_match: str | None = Header(None, alias="If-None-Match", max_length=1000),
    owner: Owner = Depends(current_owner),
    session: Session = Depends(get_session),
    storage: BlobStorage = Depends(get_storage),
) -> Response:
    row = service.get_image(session, owner, dataset_id, image_id)
    etag = f'"{row.sha256[:32]}-{size}"'
    headers = {"Cache-Control": THUMBNAIL_CACHE, "ETag": etag, "Vary": "Authorization"}
    if if_none_match is not None and etag in {t.strip().removeprefix("W/") for t in if_none_match.split(",")}:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    try:
        data = storage.get(row.storage_key)
    except BlobNotFound:
        raise NotFound(f"the stored file of image {row.id} is missing", code="image_data_missing") from None
    return Response(thumbnail_jpeg(data, size), media_type="image/jpeg", headers=headers)
