"""Small helpers for the service tests: images made on the fly, archives, polling."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import tarfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
from PIL import Image

from tests.launcher import REPO, Proc, launch, run

TINY_CONFIG = REPO / "tests" / "assets" / "tiny-vit.json"
TINY_SPEC = f"{TINY_CONFIG}::random"

# Stage 2 kept tiny: a few optimiser steps on 32 px images.
TINY_HP: dict[str, Any] = {
    "text_steps": 5,
    "epochs": 1,
    "batch_size": 4,
    "max_steps": 2,
    "prompt_tokens": 4,
}
# A job that runs until it is stopped: the most epochs a job may ask for (1000) at batch 1, i.e.
# 1000 x (images) tiny steps (~10-30 ms each on one CPU thread).
LONG_HP: dict[str, Any] = {**TINY_HP, "epochs": 1000, "batch_size": 1, "max_steps": None}


def png(seed: int, color: tuple[int, int, int] = (200, 30, 30), size: int = 40) -> bytes:
    """A distinct image (seeded noise over a colour), so no two seeds dedupe."""
    rng = np.random.default_rng(seed)
    base = np.array(color, dtype=np.int16)[None, None, :]
    noise = rng.integers(-40, 40, size=(size, size, 3), dtype=np.int16)
    arr = np.clip(base + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(seed: int, color: tuple[int, int, int] = (30, 30, 200)) -> bytes:
    img = Image.open(io.BytesIO(png(seed, color)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def zip_of(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_of(files: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:  # type: ignore[call-overload]
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_key(env: dict[str, str], owner: str, name: str | None = None) -> str:
    """A new API key of ``owner``, written straight to the database ``env`` names. The operator's way,
    ``python -m app keys create``, makes the session's key (``operator_key``) and is tested with the
    other key commands in test_auth.py."""
    from sqlalchemy.orm import Session

    from app.core.db import make_engine
    from app.keys import service as keys

    engine = make_engine(env["LAFTER_DATABASE_URL"])
    try:
        with Session(engine) as session:
            key = keys.create(session, owner, name=name).key
            session.commit()
    finally:
        engine.dispose()
    return key


def operator_key(env: dict[str, str], owner: str, name: str | None = None) -> str:
    """An API key made the way an operator makes one: ``python -m app keys create``."""
    args = ["keys", "create", "--owner", owner]
    if name:
        args += ["--name", name]
    done = run("app", args, env=env)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert key.startswith("lft_") and "\n" not in key, done.stdout
    return key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def wait_http(url: str, timeout: float = 60.0, proc: Any = None) -> None:
    def up() -> bool:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before {url} answered")
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout, 0.3, f"{url} to answer")


ADMIN_URL = os.environ.get("LAFTER_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """A new, empty Postgres database for one fixture (SQLAlchemy URL), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is needed at {ADMIN_URL} (run .ci/run, which starts it): {exc}")
    base = ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_api(env: dict[str, str], log: Path, port: int, *, append: bool = False) -> Proc:
    """A uvicorn process serving ``app.main:app`` on ``port`` with ``env``: how every test starts one
    (see ``launcher`` for how it is started)."""
    return launch(
        "uvicorn",
        ["app.main:app", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        log=log,
        append=append,
    )


@contextmanager
def api_process(env: dict[str, str], log: Path, timeout: float = 90) -> Iterator[str]:
    """One more uvicorn API process (its own settings, e.g. another database URL or queue), over
    HTTP like the main one. Yields its base URL; stops it afterwards."""
    port = free_port()
    proc = start_api(env, log, port)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=timeout, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def poll_job(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 120.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    result: dict[str, Any] = wait_for(done, timeout, 0.25, f"job {job_id} to reach {statuses}")
    return result


def upload(
    client: httpx.Client, dataset_id: str, files: list[tuple[str, bytes]], **data: str
) -> httpx.Response:
    return client.post(
        f"/v1/datasets/{dataset_id}/images",
        files=[("files", (name, content)) for name, content in files],
        data=data,
    )


def two_class_images(n: int, offset: int = 0) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        color = (210, 40, 40) if i % 2 == 0 else (40, 40, 210)
        out.append((f"img_{offset + i}.png", png(offset + i, color)))
    return out
