"""``python -m app`` alone: SQLite, the filesystem broker, a worker started alongside, local blobs.
The same upload -> job -> poll -> classify, with no Postgres or Redis settings at all; then SIGTERM
and SIGINT stop the worker too. One instance (``embedded``) serves the module: the end-to-end test
uses it, and the shutdown test submits a long job to it, stops it and starts it again."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.launcher import Proc, launch
from tests.service.helpers import (
    LONG_HP,
    TINY_CONFIG,
    TINY_HP,
    TINY_SPEC,
    free_port,
    png,
    poll_job,
    two_class_images,
    upload,
    wait_for,
    wait_http,
)
from tests.service.webhook_receiver import Receiver, signature_valid


@dataclass
class Embedded:
    """The module's ``python -m app``: its data folder, environment and, once started, its process,
    URL and worker child. ``start`` starts it again after a test stopped it."""

    data: Path
    env: dict[str, str]
    logs: list[Path] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    proc: Proc | None = None
    url: str = ""
    worker: int = 0

    def start(self) -> None:
        port = free_port()
        log = self.data.parent / f"embedded-{len(self.logs)}.log"
        self.logs.append(log)
        self.proc = launch("app", ["--port", str(port)], env=self.env, log=log, new_session=True)
        self.procs.append(self.proc)
        self.url = f"http://127.0.0.1:{port}"
        wait_http(f"{self.url}/healthz", timeout=90, proc=self.proc)
        pid = self.proc.pid
        workers = wait_for(lambda: _children(pid), 30, 0.2, "the worker child")
        assert len(workers) == 1, workers
        self.worker = workers[0]

    def print_logs(self) -> None:
        for log in self.logs:
            print(f"---- {log.name} ----\n" + log.read_text(errors="replace")[-6000:], file=sys.stderr)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Embedded]:
    data = tmp_path_factory.mktemp("embedded") / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAFTER_")}
    env.update(
        LAFTER_DATA_DIR=str(data),
        LAFTER_ALLOW_RANDOM_WEIGHTS="true",
        LAFTER_LOCAL_MODEL_DIRS=str(TINY_CONFIG.parent),  # TINY_SPEC's architecture is allowed
        LAFTER_MIN_IMAGES_PER_JOB="4",
        LAFTER_TORCH_THREADS="1",
        LAFTER_DEVICE="cpu",
        LAFTER_WEBHOOK_ALLOW_PRIVATE="true",  # the test's webhook receiver listens on 127.0.0.1
        LAFTER_PROGRESS_WRITE_INTERVAL_S="0.1",
        # No periodic checkpoint: the one a stopped job has is the one written as its worker stopped.
        LAFTER_CHECKPOINT_EVERY_S="3600",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    instance = Embedded(data, env)
    try:
        instance.start()
        yield instance
    except BaseException:
        instance.print_logs()
        raise
    finally:
        for p in instance.procs:  # the process group: an orphaned worker too
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
                pytest.fail("python -m app did not stop on SIGTERM")


def test_embedded_mode_end_to_end(embedded: Embedded) -> None:
    data, url = embedded.data, embedded.url
    try:
        with httpx.Client(base_url=url, timeout=60) as client, Receiver() as receiver:
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
                    "webhook_url": receiver.url,
                },
            )
            problem = r.json()
            assert r.status_code == 422 and problem["code"] == "webhook_secret_missing", r.text
            secret = client.post("/v1/webhook-secret").json()["secret"]
            r = client.post("/v1/jobs", json={**json.loads(r.request.content), "webhook_url": receiver.url})
            assert r.status_code == 202, r.text
            job = poll_job(client, r.json()["id"], {"succeeded", "failed", "cancelled"}, timeout=120)
            assert job["status"] == "succeeded", job
            # The embedded worker sends the job's webhook, signed.
            wait_for(lambda: receiver.calls, 30, 0.2, "the webhook")
            [call] = receiver.calls
            assert signature_valid(secret, call.headers, call.body)
            assert json.loads(call.body)["type"] == "job.succeeded"
            deliveries = wait_for(
                lambda: [d for d in client.get(f"/v1/jobs/{job['id']}").json()["webhook_deliveries"]
                         if d["state"] == "delivered"], 30, 0.2, "the delivery to be recorded"
            )  # fmt: skip
            assert deliveries[0]["id"] == call.headers["webhook-id"]
            # No language model configured: templates, and the job says so.
            assert job["metrics"]["descriptions"]["source_used"] == "templates"
            assert any(w["code"] == "descriptions" for w in job["warnings"])
            r = client.post(f"/v1/models/{job['model_id']}/classify", files=[("files", ("q.png", png(9100)))])
            assert r.status_code == 200, r.text
            assert len(r.json()["data"][0]["predictions"]) == 2
        assert (data / "lafter.db").is_file()
        assert any((data / "blobs").rglob("*"))
    except BaseException:
        embedded.print_logs()
        raise


# --- SIGTERM and SIGINT stop the worker too, promptly, with a checkpoint ------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _events(data: Path, job_id: str) -> list[str]:
    with sqlite3.connect(data / "lafter.db") as conn:
        rows = conn.execute("SELECT message FROM job_events WHERE job_id = ? ORDER BY seq", (job_id,))
        return [r[0] or "" for r in rows]


def _job_row(data: Path, job_id: str) -> tuple[str, int]:
    with sqlite3.connect(data / "lafter.db") as conn:
        status, attempts = conn.execute(
            "SELECT status, attempts FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        return str(status), int(attempts)


def _running_in_stage2(client: httpx.Client, job_id: str, min_step: int) -> bool:
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] in ("queued", "running"), job
    return bool(
        job["status"] == "running" and job["stage"] == "adapting" and job["progress"]["step"] >= min_step
    )


def _stop(proc: Proc, sig: int, worker: int) -> float:
    """Send ``sig`` to ``python -m app`` alone (not its process group) and return how long it and its
    worker took to be gone."""
    start = time.monotonic()
    os.kill(proc.pid, sig)
    try:
        proc.wait(timeout=45)
    except subprocess.TimeoutExpired:
        pytest.fail(f"python -m app did not stop on {signal.Signals(sig).name}")
    wait_for(lambda: not _alive(worker), 10, 0.1, f"worker {worker} to stop with the API")
    return time.monotonic() - start


def test_embedded_stops_its_worker_on_sigterm_and_sigint_with_a_checkpoint(embedded: Embedded) -> None:
    data = embedded.data
    try:
        assert embedded.proc is not None
        with httpx.Client(base_url=embedded.url, timeout=60) as client:
            ds = client.post("/v1/datasets", json={"name": "shutdown"}).json()
            assert upload(client, ds["id"], two_class_images(6, offset=9500)).status_code == 200
            r = client.post(
                "/v1/jobs",
                json={
                    "dataset_id": ds["id"],
                    "class_names": ["red", "blue"],
                    "base_model": TINY_SPEC,
                    "hyperparameters": LONG_HP,
                },
            )
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            wait_for(lambda: _running_in_stage2(client, job_id, 5), 180, 0.3, "stage 2 to run")

        took = _stop(embedded.proc, signal.SIGTERM, embedded.worker)
        assert took < 30, took
        status, attempts = _job_row(data, job_id)
        assert (status, attempts) == ("queued", 1)
        events = _events(data, job_id)
        checkpoints = [m for m in events if m.startswith("checkpoint at step")]
        assert len(checkpoints) == 1, events  # written as the worker stopped (no periodic one)
        assert "the worker shut down during adapting" in events[-1], events
        assert list(data.rglob("checkpoint.pt")), "no checkpoint blob"
        saved_step = int(checkpoints[0].split()[3])
        assert saved_step >= 5

        # Restarted, the job resumes from that checkpoint; SIGINT (Ctrl-C) stops both again.
        embedded.start()
        assert embedded.proc is not None
        with httpx.Client(base_url=embedded.url, timeout=60) as client:
            wait_for(
                lambda: _running_in_stage2(client, job_id, saved_step + 2), 180, 0.3, "the job to resume"
            )
        assert f"attempt 2: resuming from the checkpoint at stage-2 step {saved_step}" in _events(
            data, job_id
        )
        took = _stop(embedded.proc, signal.SIGINT, embedded.worker)
        assert took < 30, took
        assert _job_row(data, job_id) == ("queued", 2)
        assert sum(m.startswith("checkpoint at step") for m in _events(data, job_id)) == 2
    except BaseException:
        embedded.print_logs()
        raise
