"""Dataset rules: creation, uploads (decode, dedupe, split), deletion. Never commits."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Literal

from sqlalchemy.orm import Session

from app.core.auth import Owner
from app.core.errors import Conflict, Invalid, NotFound, TooLarge
from app.core.fields import parse_json
from app.core.ids import new_id
from app.core.metrics import UPLOADED_FILES
from app.core.settings import Settings
from app.core.storage import BlobWrites
from app.datasets import repository
from app.datasets.archives import iter_archive, looks_like_archive
from app.datasets.images import SIZE_CODES, Candidate, DecodedImage, Limits, Rejection, decode_image
from app.datasets.schemas import (
    AcceptedFile,
    DatasetCreate,
    DatasetImageOut,
    DatasetOut,
    DuplicateFile,
    RejectedFile,
    UploadReport,
)
from app.datasets.tables import Dataset, DatasetImage
from app.jobs import repository as jobs


@dataclass
class UploadSource:
    filename: str
    fileobj: IO[bytes]
    size: int | None


@dataclass
class _Outcome:
    accepted: list[AcceptedFile] = field(default_factory=list)
    duplicates: list[DuplicateFile] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


def limits_from(settings: Settings) -> Limits:
    return Limits(
        max_file_bytes=settings.max_file_bytes,
        max_image_pixels=settings.max_image_pixels,
        min_image_side=settings.min_image_side,
        max_archive_members=settings.max_archive_members,
        max_archive_bytes=settings.max_archive_bytes,
        max_archive_ratio=settings.max_archive_ratio,
    )


def to_out(ds: Dataset) -> DatasetOut:
    return DatasetOut(
        id=ds.id,
        name=ds.name,
        metadata=ds.metadata_,
        status="ready" if ds.image_count + ds.eval_image_count > 0 else "empty",
        image_count=ds.image_count,
        eval_image_count=ds.eval_image_count,
        total_bytes=ds.total_bytes,
        created_at=ds.created_at,
        updated_at=ds.updated_at,
    )


def create(session: Session, owner: Owner, body: DatasetCreate) -> Dataset:
    ds = Dataset(id=new_id("ds"), owner_id=owner.id, name=body.name.strip(), metadata_=body.metadata)
    session.add(ds)
    session.flush()
    return ds


def get(
    session: Session, owner: Owner, dataset_id: str, *, lock: Literal["use", "delete"] | None = None
) -> Dataset:
    ds = repository.get(session, owner.id, dataset_id, lock=lock)
    if ds is None:
        raise NotFound(f"dataset {dataset_id} not found", code="dataset_not_found")
    return ds


def get_image(session: Session, owner: Owner, dataset_id: str, image_id: str) -> DatasetImage:
    """One image of one of the owner's datasets: another owner's, or another dataset's, is not found."""
    row = repository.get_image(session, owner.id, dataset_id, image_id)
    if row is None:
        get(session, owner, dataset_id)  # an unknown dataset says so
        raise NotFound(f"image {image_id} not found in dataset {dataset_id}", code="image_not_found")
    return row


def image_out(row: DatasetImage) -> DatasetImageOut:
    return DatasetImageOut(
        id=row.id,
        filename=row.filename,
        format=row.format,
        width=row.width,
        height=row.height,
        bytes=row.size_bytes,
        sha256=row.sha256,
        split=row.split,  # type: ignore[arg-type]
        label=row.label,
        created_at=row.created_at,
    )


def parse_labels(raw: str | None) -> dict[str, str]:
    """The ``labels`` form field: a JSON object mapping file name (or archive member path) to class."""
    if raw is None or not raw.strip():
        return {}
    try:
        value: Any = parse_json(raw)
    except ValueError as exc:
        raise Invalid(f"labels is not valid JSON: {exc}", code="labels_invalid", field="labels") from None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise Invalid(
            "labels must be a JSON object of file name -> class name", code="labels_invalid", field="labels"
        )
    cleaned = {k: v.strip() for k, v in value.items()}
    empty = [k for k, v in cleaned.items() if not v]
    if empty:
        raise Invalid(f"empty class name for {empty[0]!r}", code="labels_invalid", field="labels")
    if any("\x00" in v for v in cleaned.values()):  # PostgreSQL text cannot hold it (found by fuzzing)
        raise Invalid("a class name contains a NUL character", code="labels_invalid", field="labels")
    return cleaned


# Decoded images wait at most this many bytes (or this many images) before they are stored and
# dropped from memory: an upload of any size holds about this much image data at a time.
_BATCH_BYTES = 8 * 1024 * 1024
_BATCH_IMAGES = 64


def _candidates(
    sources: Sequence[UploadSource], split: str, labels: dict[str, str], limits: Limits
) -> Generator[tuple[str, Candidate | Rejection], None, None]:
    """Every file of the request, archives unpacked, one at a time, with the upload it came from
    (the uploads themselves are spooled to disk by the multipart parser; at most one file's bytes
    are read here at once)."""
    for src in sources:
        name = src.filename or "upload"
        head = src.fileobj.read(512)
        src.fileobj.seek(0)
        kind = looks_like_archive(name, head)
        if kind is not None:
            if src.size is not None and src.size > limits.max_archive_bytes:
                yield (
                    name,
                    Rejection(
                        name,
                        "archive_too_large",
                        f"{src.size} bytes exceeds the archive limit of {limits.max_archive_bytes}",
                    ),
                )
                continue
            for item in iter_archive(name, src.fileobj, kind, limits, labelled=split == "eval"):
                if isinstance(item, Candidate):
                    member_path = item.filename.removeprefix(f"{name}/")
                    explicit = labels.get(member_path) or labels.get(item.filename)
                    if explicit is not None:
                        item = Candidate(item.filename, item.data, explicit)
                yield name, item
            continue
        if src.size is not None and src.size > limits.max_file_bytes:
            yield (
                name,
                Rejection(
                    name,
                    "file_too_large",
                    f"{src.size} bytes exceeds the per-file limit of {limits.max_file_bytes}",
                ),
            )
            continue
        data = src.fileobj.read(limits.max_file_bytes + 1)
        yield name, Candidate(name, data, labels.get(name))


@dataclass
class _Store:
    """Stores decoded images in batches: dedupe by SHA-256 against the dataset and the request,
    write new blobs, add rows. Only metadata outlives a batch."""

    session: Session
    blobs: BlobWrites
    owner: Owner
    dataset_id: str
    outcome: _Outcome
    seen: dict[str, DatasetImage] = field(default_factory=dict)
    pending: list[DecodedImage] = field(default_factory=list)
    pending_bytes: int = 0
    added_train: int = 0
    added_eval: int = 0
    added_bytes: int = 0

    def add(self, img: DecodedImage) -> None:
        self.pending.append(img)
        self.pending_bytes += len(img.data)
        if self.pending_bytes >= _BATCH_BYTES or len(self.pending) >= _BATCH_IMAGES:
            self.flush()

    def flush(self) -> None:
        unknown = {d.sha256 for d in self.pending} - self.seen.keys()
        self.seen.update(repository.images_by_sha(self.session, self.dataset_id, unknown))
        for img in self.pending:
            self._store(img)
        self.pending.clear()
        self.pending_bytes = 0

    def _store(self, img: DecodedImage) -> None:
        img_split = "eval" if img.label else "train"
        prior = self.seen.get(img.sha256)
        if prior is not None:
            if prior.split != img_split:
                # One image in both splits would leak evaluation labels into training.
                self.outcome.rejected.append(
                    Rejection(
                        img.filename,
                        "split_conflict",
                        f"the same image is already in the {prior.split} split of this dataset",
                    )
                )
            else:
                self.outcome.duplicates.append(
                    DuplicateFile(filename=img.filename, image_id=prior.id, sha256=img.sha256)
                )
            return
        key = f"images/{img.sha256[:2]}/{img.sha256}"
        self.blobs.put_if_absent(key, img.data)
        row = DatasetImage(
            id=new_id("img"),
            dataset_id=self.dataset_id,
            owner_id=self.owner.id,
            sha256=img.sha256,
            storage_key=key,
            filename=img.filename[:500],
            format=img.format,
            width=img.width,
            height=img.height,
            size_bytes=len(img.data),
            split=img_split,
            label=img.label,
        )
        self.session.add(row)
        self.seen[img.sha256] = row
        self.outcome.accepted.append(
            AcceptedFile(
                filename=img.filename,
                image_id=row.id,
                sha256=img.sha256,
                width=img.width,
                height=img.height,
                split=img_split,  # type: ignore[arg-type]
                label=img.label,
            )
        )
        self.added_bytes += len(img.data)
        if img_split == "eval":
            self.added_eval += 1
        else:
            self.added_train += 1


def add_images(
    session: Session,
    blobs: BlobWrites,
    owner: Owner,
    dataset_id: str,
    sources: Sequence[UploadSource],
    *,
    split: str,
    labels: dict[str, str],
    settings: Settings,
) -> UploadReport:
    """Decode every file, store new images once by SHA-256, and report per file. Raises (and the
    caller rolls back) when nothing at all was accepted, with the per-file reasons attached.
    Files are processed one at a time and stored in small batches, so memory stays bounded
    whatever the size of the upload. The dataset stays locked against deletion until the caller's
    transaction ends (a delete that comes later waits, one that came first leaves a 404)."""
    ds = get(session, owner, dataset_id, lock="use")
    if not sources:
        raise Invalid("no files in the request (multipart field 'files')", code="no_files", field="files")
    if split not in ("train", "eval"):
        raise Invalid("split must be 'train' or 'eval'", code="split_invalid", field="split")
    limits = limits_from(settings)
    outcome = _Outcome()
    store = _Store(session, blobs, owner, ds.id, outcome)
    items = _candidates(sources, split, labels, limits)
    for count, (source, item) in enumerate(items, start=1):
        if count > settings.max_unpacked_files:
            outcome.rejected.append(
                Rejection(
                    source,
                    "too_many_files",
                    f"the request holds more than {settings.max_unpacked_files} files once archives are "
                    "unpacked (LAFTER_MAX_UNPACKED_FILES); this one and the rest were not processed",
                )
            )
            items.close()
            break
        if isinstance(item, Rejection):
            outcome.rejected.append(item)
            continue
        if split == "eval" and not item.label:
            outcome.rejected.append(
                Rejection(
                    item.filename,
                    "label_missing",
                    "evaluation images need a class: a folder or a labels entry",
                )
            )
            continue
        if item.label is not None and len(item.label) > settings.max_class_name_length:
            outcome.rejected.append(Rejection(item.filename, "label_invalid", "the class name is too long"))
            continue
        result = decode_image(item, limits)
        if isinstance(result, Rejection):
            outcome.rejected.append(result)
        else:
            store.add(result)
    store.flush()

    UPLOADED_FILES.labels("accepted").inc(len(outcome.accepted))
    UPLOADED_FILES.labels("duplicate").inc(len(outcome.duplicates))
    UPLOADED_FILES.labels("rejected").inc(len(outcome.rejected))

    if not outcome.accepted and not outcome.duplicates:
        codes = {r.code for r in outcome.rejected}
        code = next(iter(codes)) if len(codes) == 1 else "no_images_accepted"
        error_cls = TooLarge if codes and codes <= SIZE_CODES else Invalid
        first = outcome.rejected[0].message if outcome.rejected else "no images"
        raise error_cls(
            f"no image was accepted: {first}" if len(outcome.rejected) == 1 else "no image was accepted",
            code=code,
            field="files",
            extra={"rejected": [r.as_dict() for r in outcome.rejected]},
        )

    session.flush()
    repository.add_counts(session, ds.id, store.added_train, store.added_eval, store.added_bytes)
    session.flush()
    session.refresh(ds)
    return UploadReport(
        dataset_id=ds.id,
        accepted=outcome.accepted,
        duplicates=outcome.duplicates,
        rejected=[RejectedFile(**r.as_dict()) for r in outcome.rejected],
        dataset=to_out(ds),
    )


def delete(session: Session, owner: Owner, dataset_id: str) -> list[str]:
    """Delete the dataset and its images; returns blob keys to delete after the commit. The row is
    locked first: uploads and job submissions in progress finish before the checks below run."""
    ds = get(session, owner, dataset_id, lock="delete")
    active = jobs.unfinished_job_of_dataset(session, ds.id)
    if active is not None:
        raise Conflict(f"dataset {ds.id} is used by unfinished job {active}", code="dataset_in_use")
    keys = repository.storage_keys(session, ds.id)
    repository.delete_dataset(session, ds.id)
    session.flush()
    return keys
