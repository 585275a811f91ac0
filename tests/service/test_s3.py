"""The S3 blob backend (``LAFTER_STORAGE_BACKEND=s3``) against an S3-compatible server started here:
moto's server mode on 127.0.0.1 (a separate process, spoken to over HTTP like MinIO or AWS)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.settings import Settings
from app.core.storage import BlobNotFound, BlobWrites, S3Storage, make_storage
from tests.service.conftest import Service
from tests.service.helpers import api_process, free_port, two_class_images, upload, wait_for

S3_ENV = {
    "LAFTER_S3_REGION": "us-east-1",
    "LAFTER_S3_ACCESS_KEY_ID": "testing",
    "LAFTER_S3_SECRET_ACCESS_KEY": "testing",
}


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"moto server exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            return httpx.get(f"{url}/moto-api/", timeout=2).status_code < 500
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 60, 0.2, "the moto S3 server")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def settings_for(endpoint: str, bucket: str, tmp_path: Path, prefix: str = "") -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "storage_backend": "s3",
        "s3_bucket": bucket,
        "s3_prefix": prefix,
        "s3_endpoint_url": endpoint,
        "s3_region": "us-east-1",
        "s3_access_key_id": "testing",
        "s3_secret_access_key": "testing",
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def new_bucket(store: S3Storage) -> None:
    store.client.create_bucket(Bucket=store.bucket)


def test_s3_put_get_exists_delete(s3_server: str, tmp_path: Path) -> None:
    bucket = f"lafter-{uuid.uuid4().hex[:8]}"
    store = make_storage(settings_for(s3_server, bucket, tmp_path, prefix="/tenant-a/"))
    assert isinstance(store, S3Storage)
    new_bucket(store)
    store.check()
    key = "images/ab/abcdef.png"
    assert not store.exists(key)
    with pytest.raises(BlobNotFound):
        store.get(key)
    store.put(key, b"\x89PNG first")
    assert store.exists(key) and store.get(key) == b"\x89PNG first"
    store.put(key, b"second")  # overwrite
    assert store.get(key) == b"second"
    # The prefix is where the objects live ("/tenant-a/" trimmed to "tenant-a").
    listed = store.client.list_objects_v2(Bucket=bucket)["Contents"]
    assert [o["Key"] for o in listed] == [f"tenant-a/{key}"]
    big = bytes(range(256)) * 40_000  # 10 MB: one put, read back whole
    store.put("jobs/job_x/checkpoint.pt", big)
    assert store.get("jobs/job_x/checkpoint.pt") == big
    store.delete(key)
    assert not store.exists(key)
    store.delete(key)  # deleting what is gone is no error
    with pytest.raises(BlobNotFound):
        store.get(key)


def test_s3_blob_writes_roll_back(s3_server: str, tmp_path: Path) -> None:
    store = make_storage(settings_for(s3_server, f"lafter-{uuid.uuid4().hex[:8]}", tmp_path))
    assert isinstance(store, S3Storage)
    new_bucket(store)
    store.put("images/kept", b"old")
    writes = BlobWrites(store)
    writes.put_if_absent("images/kept", b"ignored")  # present: not written, not rolled back
    writes.put_if_absent("images/new", b"new")
    assert writes.new_keys == ["images/new"]
    writes.rollback()
    assert store.get("images/kept") == b"old"
    assert not store.exists("images/new")


def test_s3_errors_are_not_taken_for_absence(s3_server: str, tmp_path: Path) -> None:
    """A missing bucket (or a server that refuses) is an error, not "no such blob": otherwise a
    checkpoint would be ignored and uploads would go on to fail later."""
    store = make_storage(settings_for(s3_server, f"missing-{uuid.uuid4().hex[:8]}", tmp_path))
    with pytest.raises(Exception) as check:
        store.check()
    assert not isinstance(check.value, BlobNotFound)
    with pytest.raises(Exception) as exists:
        store.exists("images/anything")
    assert not isinstance(exists.value, BlobNotFound)


def test_upload_through_the_service_on_s3(service: Service, s3_server: str, tmp_path: Path) -> None:
    bucket = f"lafter-svc-{uuid.uuid4().hex[:8]}"
    new_bucket(S3Storage(settings_for(s3_server, bucket, tmp_path)))
    env = {
        **service.env,
        **S3_ENV,
        "LAFTER_STORAGE_BACKEND": "s3",
        "LAFTER_S3_BUCKET": bucket,
        "LAFTER_S3_PREFIX": "blobs",
        "LAFTER_S3_ENDPOINT_URL": s3_server,
        "LAFTER_REAPER_INTERVAL_S": "0",  # the shared stack's API does the housekeeping
    }
    with api_process(env, tmp_path / "api-s3.log") as url:
        client = service.client_for(service.key)
        client.base_url = httpx.URL(url)
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["storage"] == "ok", ready.text
        ds = client.post("/v1/datasets", json={"name": "s3"}).json()
        images = two_class_images(3, offset=84000)
        r = upload(client, ds["id"], images)
        assert r.status_code == 200 and len(r.json()["accepted"]) == 3, r.text
        store = S3Storage(settings_for(s3_server, bucket, tmp_path))
        keys = [o["Key"] for o in store.client.list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert len(keys) == 3 and all(k.startswith("blobs/") for k in keys), keys
        stored = {store.client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}
        assert stored == {data for _, data in images}
        assert client.delete(f"/v1/datasets/{ds['id']}").status_code == 204
        client.close()
