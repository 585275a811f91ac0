"""What a hostile user found in a security review, each now a 4xx.

- ``base_model`` names only open_clip's pretrained tags, files inside the configured local model
  folders, and ``ARCH::random`` where allowed; the refusal is the same whether a path exists or not;
- ``/v1/classify`` validates offline, loads a spec once at a time and remembers a failed load;
- deeply nested JSON in form fields, uploads and jobs racing a dataset's deletion: 4xx, never 500;
- a job's unexpected error shows an error id, never SQL, tracebacks or server paths;
- the API key is checked before a body is read; ``metadata`` is capped; class names are normalised
  (NFKC, format characters removed) before duplicates are looked for.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from app.core.errors import Invalid
from app.core.settings import Settings
from tests.service.conftest import MAX_REQUEST_BYTES, MIN_IMAGES, Service
from tests.service.helpers import (
    TINY_CONFIG,
    TINY_HP,
    TINY_SPEC,
    create_key,
    png,
    poll_job,
    two_class_images,
    upload,
)


def problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.text
    body: dict[str, Any] = r.json()
    assert body["code"] == code, body
    return body


def job_body(dataset: str, **overrides: Any) -> dict[str, Any]:
    return {
        "dataset_id": dataset,
        "class_names": ["cat", "dog"],
        "base_model": TINY_SPEC,
        "descriptions": {"source": "templates"},
        "hyperparameters": TINY_HP,
        **overrides,
    }


def classify(client: httpx.Client, spec: str, names: str = '["cat", "dog"]') -> httpx.Response:
    return client.post(
        "/v1/classify",
        files=[("files", ("q.png", png(77001)))],
        data={"base_model": spec, "class_names": names},
    )


def stop(client: httpx.Client, job_id: str) -> None:
    """Cancel a job this module made and wait until it is final: a job still running in the shared
    worker would write events while later tests count rows."""
    client.post(f"/v1/jobs/{job_id}/cancel")
    poll_job(client, job_id, {"succeeded", "failed", "cancelled"}, timeout=120)


def jobs_count(service: Service) -> int:
    return service.count("jobs")


@pytest.fixture(scope="module")
def ready(service: Service) -> dict[str, Any]:
    ds = service.client.post("/v1/datasets", json={"name": "trust"}).json()
    r = upload(service.client, ds["id"], two_class_images(MIN_IMAGES, offset=70000))
    assert r.status_code == 200, r.text
    return ds


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "local_model_dirs": [tmp_path / "models"],
        "allow_random_weights": True,
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


# --- 1. base_model names no server file ---------------------------------------------------------


def test_base_model_names_no_server_file(service: Service, ready: dict[str, Any]) -> None:
    models = service.root / "models"
    hostile_dir = models / "hostile"
    hostile_dir.mkdir(exist_ok=True)
    for name, target in (("passwd.pt", "/etc/passwd"), ("missing.pt", "/etc/nonexistent")):
        link = hostile_dir / name
        if not link.is_symlink():
            link.symlink_to(target)  # inside the folder, pointing out of it
    blob = next(p for p in service.storage_dir.rglob("*") if p.is_file())  # another owner's image?
    specs = [
        "ViT-B-32::/etc/passwd",
        "ViT-B-32::/etc/nonexistent",
        "ViT-B-32::../../etc/passwd",
        "ViT-B-32::etc/passwd.pt",
        "ViT-B-32::/proc/self/environ",
        f"ViT-B-32::{models}/../../../etc/passwd",
        f"ViT-B-32::{models}/../models/tiny-local.pt",  # '..' is refused even when it lands inside
        f"ViT-B-32::{hostile_dir}/passwd.pt",
        f"ViT-B-32::{hostile_dir}/missing.pt",
        f"ViT-B-32::{blob}",
        f"ViT-B-32::{str(blob)[:-4]}0000",  # a blob that does not exist: the same answer
        "/etc/passwd.json::random",
        "/etc/nonexistent.json::random",
        f"{models}/../x.json::random",
    ]
    before = jobs_count(service)
    details = set()
    for spec in specs:
        body = problem(service.client.post("/v1/jobs", json=job_body(ready["id"], base_model=spec)), 422,
                       "base_model_not_allowed")  # fmt: skip
        assert body["field"] == "base_model"
        details.add(body["detail"])
        details.add(problem(classify(service.client, spec), 422, "base_model_not_allowed")["detail"])
    # One answer for every path outside the folders, whether it exists or not: nothing to probe.
    assert len(details) == 1, details
    assert "/etc" not in next(iter(details))
    assert jobs_count(service) == before
    # The deployment's own models still work through the allow-list.
    r = classify(service.client, f"{models}/tiny-local.json::{models}/tiny-local.pt")
    assert r.status_code == 200, r.text
    r = classify(service.client, TINY_SPEC)  # tests/assets is one of the test deployment's folders
    assert r.status_code == 200, r.text


def test_base_model_allow_list_rules(tmp_path: Path) -> None:
    from app.base_models.service import validate_spec

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(TINY_CONFIG, models / "tiny.json")
    (models / "w.pt").write_bytes(b"weights")
    settings = settings_for(tmp_path)
    assert validate_spec("ViT-B-32::openai", settings) == "ViT-B-32::openai"  # listed by open_clip
    assert validate_spec(f"{models}/tiny.json::random", settings)
    assert validate_spec(f"ViT-B-32::{models}/w.pt", settings)

    def refused(spec: str, s: Settings = settings) -> str:
        with pytest.raises(Invalid) as info:
            validate_spec(spec, s)
        return info.value.code

    assert refused("ViT-B-32::/etc/passwd") == "base_model_not_allowed"
    assert refused("ViT-B-32::random", settings_for(tmp_path, allow_random_weights=False)) == (
        "base_model_not_allowed"
    )
    assert refused("ViT-B-32::no_such_tag") == "base_model_invalid"
    # An operator may allow any path (never in production) ...
    anywhere = settings_for(tmp_path, allow_any_model_path=True)
    other = tmp_path / "elsewhere.pt"
    other.write_bytes(b"x")
    assert validate_spec(f"ViT-B-32::{other}", anywhere)
    assert refused(f"ViT-B-32::{other}") == "base_model_not_allowed"
    with pytest.raises(ValidationError, match="LAFTER_ALLOW_ANY_MODEL_PATH"):
        Settings(  # type: ignore[call-arg]
            _env_file=None,
            env="production",
            database_url="postgresql+psycopg://u@h/db",
            broker_url="redis://h:6379/0",
            allow_any_model_path=True,
        )


# --- 2. zero-shot classify: offline validation, one load at a time, failures remembered ----------


def base_loads(service: Service) -> float:
    text = httpx.get(f"{service.url}/metrics").text
    match = re.search(r'^lafter_model_loads_total\{what="base"\} ([0-9.e+]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_zero_shot_validates_offline_loads_once_and_remembers_failures(service: Service) -> None:
    # A model hub spec is refused at once: nothing is fetched while validating.
    for spec in ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K::x", "local-dir:/etc::x"):
        t = time.monotonic()
        problem(classify(service.client, spec), 422, "base_model_not_allowed")
        assert time.monotonic() - t < 5

    models = service.root / "models"
    (models / "zs").mkdir(exist_ok=True)
    broken = models / "zs" / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    shutil.copy(models / "tiny-local.pt", models / "zs" / "fresh.pt")
    failing = f"{models}/tiny-local.json::{broken}"
    fresh = f"{models}/tiny-local.json::{models}/zs/fresh.pt"

    def at_once(spec: str, n: int = 6) -> list[httpx.Response]:
        barrier = threading.Barrier(n)
        out: list[httpx.Response] = []

        def one() -> None:
            with service.client_for(service.key) as client:
                barrier.wait()
                out.append(classify(client, spec))

        threads = [threading.Thread(target=one) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    loads = base_loads(service)
    answers = at_once(failing)
    for r in answers:
        problem(r, 422, "weights_unavailable")
    assert base_loads(service) == loads + 1  # one load for six requests
    again = problem(classify(service.client, failing), 422, "weights_unavailable")
    assert "retr" in again["detail"]  # says when it will be tried again
    assert base_loads(service) == loads + 1  # remembered: not tried again

    answers = at_once(fresh)
    assert [r.status_code for r in answers] == [200] * 6, [r.text for r in answers]
    assert base_loads(service) == loads + 2  # six requests, one load


# --- 3. deeply nested JSON in form fields --------------------------------------------------------


def test_deeply_nested_json_in_form_fields_is_a_422(service: Service, ready: dict[str, Any]) -> None:
    nested = "[" * 100_000 + "]" * 100_000
    with service.client_for(service.key) as client:
        r = upload(client, ready["id"], [("q.png", png(70999))], split="eval", labels=nested)
        problem(r, 422, "labels_invalid")
        assert r.headers.get("connection") != "close"  # a 500 used to drop the keep-alive connection
        r = upload(client, ready["id"], [("q.png", png(70999))], split="eval", labels='{"a": ' + nested + "}")
        problem(r, 422, "labels_invalid")
        r = classify(client, TINY_SPEC, names=nested)
        assert problem(r, 422, "validation_error")["field"] == "class_names"
        # JSON bodies: a 4xx too, and the keep-alive connection survives all of it.
        deep = '{"name": "x", "metadata": {"a": ' + nested + "}}"
        r = client.post("/v1/datasets", content=deep, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, r.text
        deep = '{"name": "x", "metadata": {"a": ' + "[" * 500 + "]" * 500 + "}}"
        r = client.post("/v1/datasets", content=deep, headers={"content-type": "application/json"})
        assert r.status_code == 422, r.text
        assert client.get(f"/v1/datasets/{ready['id']}").status_code == 200


# --- 4. uploads and jobs racing a dataset's deletion --------------------------------------------


def race(
    first: Callable[[], httpx.Response], second: Callable[[], httpx.Response], delay: float
) -> tuple[httpx.Response, httpx.Response]:
    barrier = threading.Barrier(2)
    out: dict[str, httpx.Response] = {}

    def run(name: str, call: Callable[[], httpx.Response], wait: float) -> None:
        barrier.wait()
        time.sleep(wait)
        out[name] = call()

    threads = [  # a negative delay holds the first call back instead
        threading.Thread(target=run, args=("first", first, max(0.0, -delay))),
        threading.Thread(target=run, args=("second", second, max(0.0, delay))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out["first"], out["second"]


def test_upload_racing_delete_of_its_dataset(service: Service) -> None:
    a = service.client_for(service.key)
    b = service.client_for(service.key)
    seen = []
    try:
        for trial in range(10):
            ds = a.post("/v1/datasets", json={"name": f"race-{trial}"}).json()
            files = two_class_images(24, offset=71000 + 100 * trial)
            up, rm = race(
                lambda ds=ds, files=files: upload(a, ds["id"], files),
                lambda ds=ds: b.delete(f"/v1/datasets/{ds['id']}"),
                delay=0.01 * (trial - 4),
            )
            seen.append((up.status_code, rm.status_code))
            assert rm.status_code == 204, rm.text
            if up.status_code != 200:
                problem(up, 404, "dataset_not_found")
            with service.engine.connect() as conn:
                left = conn.execute(
                    sa.text("SELECT count(*) FROM dataset_images WHERE dataset_id = :d"), {"d": ds["id"]}
                ).scalar_one()
            assert left == 0  # whoever won, nothing of the deleted dataset is left behind
    finally:
        a.close()
        b.close()
    print("upload/delete outcomes:", seen)


def test_job_submitted_while_its_dataset_is_deleted(service: Service) -> None:
    key = create_key(service.env, "racer")
    a = service.client_for(key)
    b = service.client_for(key)
    seen = []
    try:
        for trial in range(16):
            ds = a.post("/v1/datasets", json={"name": f"job-race-{trial}"}).json()
            r = upload(a, ds["id"], two_class_images(MIN_IMAGES, offset=72000 + 100 * trial))
            assert r.status_code == 200, r.text
            job, rm = race(
                lambda ds=ds: a.post("/v1/jobs", json=job_body(ds["id"])),
                lambda ds=ds: b.delete(f"/v1/datasets/{ds['id']}"),
                delay=0.002 * (trial - 6),
            )
            seen.append((job.status_code, rm.status_code))
            if job.status_code == 202:
                assert job.json()["dataset_id"] == ds["id"]
                problem(rm, 409, "dataset_in_use")  # the job won: the dataset stays
                stop(a, job.json()["id"])
            else:
                problem(job, 422, "dataset_not_found")  # the delete won: no job
                assert rm.status_code == 204, rm.text
        with service.engine.connect() as conn:
            orphans = conn.execute(
                sa.text("SELECT count(*) FROM jobs WHERE owner_id = 'racer' AND dataset_id IS NULL")
            ).scalar_one()
        assert orphans == 0
    finally:
        a.close()
        b.close()
    print("job/delete outcomes:", seen)


# --- 5. a job's unexpected error shows an id, not its details ----------------------------------


def test_internal_error_shows_an_error_id_not_sql_or_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from sqlalchemy.orm import sessionmaker

    from app.core.db import make_engine
    from app.core.migrate import upgrade_head
    from app.core.storage import make_storage
    from app.jobs.tables import Job, JobEvent
    from worker import pipeline

    settings = settings_for(tmp_path, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}")
    upgrade_head(settings.database_url)
    engine = make_engine(settings.database_url)
    sessions = sessionmaker(bind=engine, expire_on_commit=False)
    with sessions() as session:
        session.add(Job(id="job_internal", owner_id="o", status="queued", base_model=TINY_SPEC,
                        class_names=["a", "b"], seed=0))  # fmt: skip
        session.commit()

    secret = (
        "(psycopg.errors.NumericValueOutOfRange) integer out of range\n[SQL: UPDATE jobs SET step=%(step)s "
        'WHERE jobs.id = %(id)s]\n  File "/srv/lafter/worker/pipeline.py", line 3, in execute'
    )

    def boom(*_args: Any, **_kwargs: Any) -> Any:
        raise sa.exc.DataError(secret, {"step": 3_000_000_000}, Exception("/var/lib/lafter/blobs/x"))

    monkeypatch.setattr(pipeline, "execute", boom)
    with caplog.at_level(logging.ERROR, logger="worker.pipeline"):
        assert pipeline.run_job("job_internal", settings, sessions, make_storage(settings)) == "failed"
    with sessions() as session:
        job = session.get(Job, "job_internal")
        assert job is not None and job.error_code == "internal_error"
        message = job.error_message or ""
        events = [e.message or "" for e in session.query(JobEvent).filter(JobEvent.job_id == job.id)]
    engine.dispose()
    for text in [message, *events]:
        for leak in (
            "SQL",
            "UPDATE",
            "Traceback",
            "File ",
            "/srv",
            "/var",
            "integer out of range",
            "DataError",
        ):
            assert leak not in text, text
    error_id = re.search(r"\berr_[0-9a-f]{8,}\b", message)
    assert error_id, message
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert error_id.group(0) in logged  # the operator finds the details by the id
    assert "integer out of range" in caplog.text


# --- 6. the API key is checked before any body is read ------------------------------------------


def _raw_post(service: Service, path: str, headers: dict[str, str], declared: int, sent: bytes) -> bytes:
    url = urlsplit(service.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {url.hostname}\r\nContent-Length: {declared}\r\n{head}\r\n".encode()
            + sent
        )
        sock.settimeout(5)  # the rest of the body is never sent: an answer must not wait for it
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/datasets"])
def test_the_key_is_checked_before_the_body_is_read(service: Service, path: str) -> None:
    json_ct = {"Content-Type": "application/json"}
    cases = [
        ({}, MAX_REQUEST_BYTES - 1000, "auth_missing"),  # under the body limit: only the key stops it
        ({}, 150 * 1024 * 1024, "auth_missing"),  # 150 MB, beyond the limit: 401 first
        ({"Authorization": "Bearer lft_nope_nope"}, MAX_REQUEST_BYTES - 1000, "auth_invalid"),
    ]
    for extra, declared, code in cases:
        answer = _raw_post(service, path, {**json_ct, **extra}, declared, b'{"name": "')
        assert answer.startswith(b"HTTP/1.1 401"), answer[:300]
        assert code.encode() in answer
        assert b"www-authenticate: bearer" in answer.lower()


# --- 7. metadata is capped ----------------------------------------------------------------------


def test_metadata_is_capped(service: Service, ready: dict[str, Any]) -> None:
    small = {"notes": "x" * 15_000}
    big = {"notes": "x" * 17_000}
    r = service.client.post("/v1/datasets", json={"name": "meta-ok", "metadata": small})
    assert r.status_code == 201, r.text
    body = problem(service.client.post("/v1/datasets", json={"name": "meta-big", "metadata": big}), 422,
                   "validation_error")  # fmt: skip
    assert body["field"] == "metadata" and "16384" in body["detail"]
    before = jobs_count(service)
    body = problem(service.client.post("/v1/jobs", json=job_body(ready["id"], metadata=big)), 422,
                   "validation_error")  # fmt: skip
    assert body["field"] == "metadata"
    assert jobs_count(service) == before


# --- 8. class names are normalised before they are compared -------------------------------------


def test_class_names_are_normalised_and_invisible_ones_refused(
    service: Service, ready: dict[str, Any]
) -> None:
    before = jobs_count(service)
    for names, code, field in [
        (["cat", "c\u200bat"], "class_names_duplicate", "class_names.1"),
        (["cat", "\uff43\uff41\uff54"], "class_names_duplicate", "class_names.1"),  # full-width
        (["Cat", "cat\u2060"], "class_names_duplicate", "class_names.1"),
        (["cat", "\u200b\u200c\u200d"], "class_name_empty", "class_names.1"),
        (["\u3164", "dog"], "class_name_empty", "class_names.0"),  # a Hangul filler: invisible
        (["cat", "\u00ad"], "class_name_empty", "class_names.1"),  # a soft hyphen alone
    ]:
        body = problem(
            service.client.post("/v1/jobs", json=job_body(ready["id"], class_names=names)), 422, code
        )
        assert body["field"] == field, body
        r = classify(service.client, TINY_SPEC, names=json.dumps(names))
        problem(r, 422, code)
    provided = {"source": "provided", "provided": {"cat": [], "dog": ["a photo of a dog"]}}
    body = problem(service.client.post("/v1/jobs", json=job_body(ready["id"], descriptions=provided)), 422,
                   "descriptions_invalid")  # fmt: skip
    assert body["field"] == "descriptions.provided.cat" and "cat" in body["detail"]
    provided = {"source": "provided", "provided": {"cat": ["  "], "dog": ["a photo of a dog"]}}
    problem(service.client.post("/v1/jobs", json=job_body(ready["id"], descriptions=provided)), 422,
            "descriptions_invalid")  # fmt: skip
    assert jobs_count(service) == before

    # What is stored is the normalised name.
    r = service.client.post(
        "/v1/jobs", json=job_body(ready["id"], class_names=["\uff43\uff41\uff54", "d\u200bog"])
    )
    assert r.status_code == 202, r.text
    assert r.json()["class_names"] == ["cat", "dog"]
    stop(service.client, r.json()["id"])


def test_the_class_name_rules_live_in_the_library() -> None:
    from lafter.descriptions import class_key, normalize_class_name, validate_class_names
    from lafter.errors import InvalidInputError

    assert normalize_class_name(" \uff43a\u200bt ") == "cat"
    assert normalize_class_name("\u200b\u3164") == ""
    assert class_key("Golden_Retriever") == class_key("golden\u00a0retriever") == "golden retriever"
    assert validate_class_names(["\uff43at", "dog"]) == ["cat", "dog"]
    with pytest.raises(InvalidInputError):
        validate_class_names(["cat", "c\u200bat"])
    with pytest.raises(InvalidInputError):
        validate_class_names(["cat", "\u200b"])
