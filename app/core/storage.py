"""Blob storage behind one small interface: a local folder by default, any S3-compatible store
(AWS, MinIO, R2, Ceph) by setting. Keys are content-addressed by the caller (``images/ab/abcd...``).
"""

from __future__ import annotations

import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from app.core.settings import Settings, get_settings


class BlobNotFound(KeyError):
    pass


class BlobStorage(Protocol):
    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def check(self) -> None:
        """Raise if the store cannot be reached (readiness)."""
        ...


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"blob key escapes the storage root: {key!r}")
        return path

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename: a reader never sees half a blob, a crash leaves only a temp file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise BlobNotFound(key) from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def check(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise OSError(f"storage folder {self.root} is not writable")


class S3Storage:
    """Any S3-compatible store through boto3 (installed with the ``service`` extra)."""

    def __init__(self, settings: Settings) -> None:
        import boto3

        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix.strip("/")
        self._bucket_seen = False
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=settings.s3_secret_access_key,
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get(self, key: str) -> bytes:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.NoSuchKey as exc:
            raise BlobNotFound(key) from exc
        return bytes(obj["Body"].read())

    def exists(self, key: str) -> bool:
        """False only when the server says there is no such object (404); any other failure (no
        bucket, no access, no server) raises, so it is never taken for a missing blob."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound") and status == 404 and not self._bucket_missing():
                return False
            raise
        return True

    def _bucket_missing(self) -> bool:
        """HEAD answers a bare 404 for a missing bucket too: ask the bucket itself (once it was
        seen, a later 404 is the object's: a bucket deleted under a running service fails its puts)."""
        from botocore.exceptions import ClientError

        if self._bucket_seen:
            return False
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            return True
        self._bucket_seen = True
        return False

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)


def make_storage(settings: Settings) -> BlobStorage:
    if settings.storage_backend == "s3":
        return S3Storage(settings)
    return LocalStorage(settings.blob_dir)


@lru_cache(maxsize=1)
def get_storage() -> BlobStorage:
    return make_storage(get_settings())


class BlobWrites:
    """The blobs one request wrote. If its transaction does not commit, ``rollback`` removes them,
    so a failed upload leaves no stray files behind (blob writes are not transactional)."""

    def __init__(self, storage: BlobStorage) -> None:
        self.storage = storage
        self.new_keys: list[str] = []

    def put_if_absent(self, key: str, data: bytes) -> None:
        if not self.storage.exists(key):
            self.storage.put(key, data)
            self.new_keys.append(key)

    def rollback(self) -> None:
        for key in self.new_keys:
            try:
                self.storage.delete(key)
            except Exception:  # best effort: an orphaned blob is garbage, not corruption
                continue
        self.new_keys.clear()
