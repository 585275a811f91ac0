"""``python -m app`` alone: SQLite, the filesystem broker, a worker started alongside, local blobs.
The same upload -> job -> poll -> classify, with no Postgres or Redis settings at all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.service.helpers import (
    REPO,
    TINY_CONFIG,
    TINY_HP,
    TINY_SPEC,
    free_port,
    png,
    poll_job,
    two_class_images,
    upload,
    wait_http,
)


def test_embedded_mode_end_to_end(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAFTER_")}
    env.update(
        LAFTER_DATA_DIR=str(data),
        LAFTER_ALLOW_RANDOM_WEIGHTS="true",
        LAFTER_LOCAL_MODEL_DIRS=str(TINY_CONFIG.parent),  # TINY_SPEC's architecture is allowed
        LAFTER_MIN_IMAGES_PER_JOB="4",
        LAFTER_TORCH_THREADS="1",
        LAFTER_DEVICE="cpu",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    log = (tmp_path / "embedded.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", timeout=90, proc=proc)
        with httpx.Client(base_url=url, timeout=60) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 200, ready.text
            ds = client.post("/v1/datasets", json={"name": "embedded"}).json()
            r = upload(client, ds["id"], two_class_images(6, offset=9000))
            assert r.status_code == 200 and len(r.json()["accepted"]) == 6, r.text
            r = client.post(
                "/v1/jobs",
                json={
                    "dataset_id": ds["id"],
                    "class_names": ["red", "blue"],
                    "base_model": TINY_SPEC,
                    "hyperparameters": TINY_HP,
                },
            )
            assert r.status_code == 202, r.text
            job = poll_job(client, r.json()["id"], {"succeeded", "failed", "cancelled"}, timeout=120)
            assert job["status"] == "succeeded", job
            # No language model configured: templates, and the job says so.
            assert job["metrics"]["descriptions"]["source_used"] == "templates"
            assert any(w["code"] == "descriptions" for w in job["warnings"])
            r = client.post(f"/v1/models/{job['model_id']}/classify", files=[("files", ("q.png", png(9100)))])
            assert r.status_code == 200, r.text
            assert len(r.json()["data"][0]["predictions"]) == 2
        assert (data / "lafter.db").is_file()
        assert any((data / "blobs").rglob("*"))
    except BaseException:
        log.flush()
        print((tmp_path / "embedded.log").read_text(errors="replace")[-5000:], file=sys.stderr)
        raise
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("python -m app did not stop on SIGTERM")
