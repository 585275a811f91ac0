"""A service stack the tests may break: its own Postgres database (made by ``alembic upgrade head``),
its own ``redis-server`` on a free port (no persistence, so a restart loses everything in it), a
uvicorn API with the reaper running every 0.5 s, and Celery worker processes the tests start, kill
with SIGKILL and restart. Settings are shrunk so a lost worker is noticed in seconds.

Loaded with ``pytest_plugins = ["tests.service.fixtures_worker"]`` (so test modules import from it
only under ``TYPE_CHECKING``); the ``stack`` fixture is one per session, shared by the crash, cancel
and queue-cap tests. Each test acts as its own owner (an API key
of its own), so the per-owner cap of 1 set here never couples two tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import httpx
import pytest
import redis
import sqlalchemy as sa

from tests.launcher import Proc, launch, run
from tests.service.conftest import MIN_IMAGES
from tests.service.factories import submit_job
from tests.service.helpers import (
    LONG_HP,
    TINY_CONFIG,
    create_key,
    free_port,
    scratch_database,
    start_api,
    two_class_images,
    upload,
    wait_for,
    wait_http,
)

HEARTBEAT_INTERVAL_S = 0.5
HEARTBEAT_TIMEOUT_S = 4.0
REAPER_INTERVAL_S = 0.5
MAX_ATTEMPTS = 2
CAP = 1
# From a worker's death to its job leaving ``running``: the timeout, a reaper pass, and slack for
# a loaded 2-core machine.
REAP_BOUND_S = HEARTBEAT_TIMEOUT_S + 2 * REAPER_INTERVAL_S + 6.0

FINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Tenant:
    """One owner of the stack: an API key, a client that sends it, and a dataset."""

    owner: str
    client: httpx.Client
    dataset_id: str

    def submit(self, **overrides: Any) -> dict[str, Any]:
        return submit_job(self.client, self.dataset_id, **overrides)

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.client.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    def events(self, job_id: str) -> list[dict[str, Any]]:
        r = self.client.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000})
        assert r.status_code == 200, r.text
        data: list[dict[str, Any]] = r.json()["data"]
        return data

    def wait(self, job_id: str, predicate: Any, timeout: float, what: str) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if predicate(job) else None

        found: dict[str, Any] = wait_for(check, timeout, 0.1, f"job {job_id}: {what}")
        return found

    def wait_final(self, job_id: str, timeout: float = 90.0) -> dict[str, Any]:
        return self.wait(job_id, lambda j: j["status"] in FINAL, timeout, "a final status")

    def wait_training(self, job_id: str, min_step: int = 1, timeout: float = 90.0) -> dict[str, Any]:
        return self.wait(
            job_id,
            lambda j: (
                j["status"] == "running" and j["stage"] == "adapting" and j["progress"]["step"] >= min_step
            ),
            timeout,
            f"stage 2 at step >= {min_step}",
        )


@dataclass
class Stack:
    # For the tests, which import this module's names only for type checking (it is a plugin).
    reap_bound_s: ClassVar[float] = REAP_BOUND_S
    max_attempts: ClassVar[int] = MAX_ATTEMPTS
    cap: ClassVar[int] = CAP
    long_hp: ClassVar[dict[str, Any]] = LONG_HP

    root: Path
    db_url: str
    redis_port: int
    env: dict[str, str]
    engine: sa.Engine
    url: str = ""
    api: Proc | None = None
    redis_proc: subprocess.Popen[bytes] | None = None
    workers: list[Proc] = field(default_factory=list)
    clients: list[httpx.Client] = field(default_factory=list)

    @property
    def broker_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def storage_dir(self) -> Path:
        return self.root / "blobs"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def redis(self) -> redis.Redis:
        return redis.Redis(port=self.redis_port, socket_timeout=5)

    def in_broker(self, job_id: str) -> bool:
        """Whether a message for ``job_id`` waits in the ``gpu`` queue (job ids are in its headers)."""
        waiting = cast(list[bytes], self.redis().lrange("gpu", 0, -1))
        return any(job_id.encode() in raw for raw in waiting)

    # --- processes -----------------------------------------------------------------------------
    def start_redis(self) -> None:
        self.redis_proc = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no"],
            stdout=(self.logs / "redis.log").open("ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip

        def up() -> bool:
            try:
                return bool(self.redis().ping())
            except redis.RedisError:
                return False

        wait_for(up, 20, 0.05, "the private redis-server")

    def kill_redis(self) -> None:
        """SIGKILL: with no persistence, every message and key in it is gone."""
        assert self.redis_proc is not None
        self.redis_proc.kill()
        self.redis_proc.wait(timeout=10)
        self.redis_proc = None

    def start_api(self) -> None:
        self.api = start_api(self.env, self.logs / "api.log", int(self.url.rsplit(":", 1)[1]), append=True)
        wait_http(f"{self.url}/healthz", timeout=120, proc=self.api)

    def start_worker(self) -> Proc:
        name = f"w{len(self.workers)}-{uuid.uuid4().hex[:4]}"
        log = self.logs / f"worker-{name}.log"
        proc = launch(
            "celery",
            ["-A", "worker.celery_app", "worker", "--pool=solo", "-Q", "gpu", "--loglevel=INFO",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "--hostname", f"{name}@%h"],
            env=self.env, log=log,
        )  # fmt: skip
        self.workers.append(proc)

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"worker exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            return "ready." in log.read_text(errors="replace")

        wait_for(ready, 120, 0.2, "a worker to be ready")
        return proc

    def boot_worker(self) -> Booting:
        """``start_worker`` in the background (a start takes seconds); ``join`` waits and re-raises."""
        return Booting(self)

    def worker_of(self, job_id: str) -> Proc:
        """The live worker process that claimed ``job_id`` (the row names it ``host:pid``)."""
        with self.engine.connect() as conn:
            worker_id = conn.execute(
                sa.text("SELECT worker_id FROM jobs WHERE id = :i"), {"i": job_id}
            ).scalar()
        pid = int(str(worker_id).rsplit(":", 1)[1])
        found = [w for w in self.live_workers() if w.pid == pid]
        assert found, f"no live worker has pid {pid}"
        return found[0]

    def live_workers(self) -> list[Proc]:
        return [w for w in self.workers if w.poll() is None]

    def ensure_worker(self) -> Proc:
        live = self.live_workers()
        return live[0] if live else self.start_worker()

    def kill_worker(self, proc: Proc) -> None:
        """What an OOM killer or a lost machine does: no cleanup, no ack, no last words."""
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_workers(self) -> None:
        """A warm shutdown (SIGTERM) of every live worker; they are idle when the tests call this."""
        for proc in self.live_workers():
            proc.terminate()
        for proc in self.workers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    # --- owners --------------------------------------------------------------------------------
    def tenant(self, owner: str, images: int = MIN_IMAGES) -> Tenant:
        key = create_key(self.env, owner, name="pytest")
        client = httpx.Client(base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {key}"})
        self.clients.append(client)
        ds = client.post("/v1/datasets", json={"name": f"{owner} photos"})
        assert ds.status_code == 201, ds.text
        r = upload(
            client, ds.json()["id"], two_class_images(images, offset=zlib.crc32(owner.encode()) % 10_000)
        )
        assert r.status_code == 200, r.text
        return Tenant(owner, client, ds.json()["id"])

    def settings(self) -> Any:
        """The stack's settings, for running the pipeline inside the test process."""
        from app.core.settings import Settings

        given: dict[str, Any] = {
            k[len("LAFTER_") :].lower(): v for k, v in self.env.items() if k.startswith("LAFTER_")
        }
        return Settings(_env_file=None, **given)  # type: ignore[call-arg]

    def tail(self) -> str:
        parts = []
        for log in sorted(self.logs.glob("*.log")):
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if '"GET /v1/jobs' not in ln]
            lines = lines[-40:]
            parts.append(f"---- {log.name} ----\n" + "\n".join(lines))
        return "\n".join(parts)


class Booting:
    def __init__(self, stack: Stack) -> None:
        self.error: BaseException | None = None
        self.worker: Proc | None = None
        self._thread = threading.Thread(target=self._run, args=(stack,))
        self._thread.start()

    def _run(self, stack: Stack) -> None:
        try:
            self.worker = stack.start_worker()
        except BaseException as exc:
            self.error = exc

    def join(self) -> Proc:
        self._thread.join()
        if self.error is not None:
            raise self.error
        assert self.worker is not None
        return self.worker


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with scratch_database("lafter_stack") as db_url:
        yield from _stack(tmp_path_factory, db_url)


def _stack(tmp_path_factory: pytest.TempPathFactory, db_url: str) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("stack")
    (root / "logs").mkdir()
    redis_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAFTER_")}
    env.update(
        LAFTER_ENV="test",
        LAFTER_AUTH="on",
        LAFTER_DATA_DIR=str(root),
        LAFTER_DATABASE_URL=db_url,
        LAFTER_BROKER_URL=f"redis://127.0.0.1:{redis_port}/0",
        LAFTER_STORAGE_DIR=str(root / "blobs"),
        LAFTER_ALLOW_RANDOM_WEIGHTS="true",
        LAFTER_LOCAL_MODEL_DIRS=str(TINY_CONFIG.parent),  # TINY_SPEC's architecture is allowed
        LAFTER_MIN_IMAGES_PER_JOB=str(MIN_IMAGES),
        LAFTER_DEVICE="cpu",
        LAFTER_API_DEVICE="cpu",
        LAFTER_TORCH_THREADS="1",
        LAFTER_HEARTBEAT_INTERVAL_S=str(HEARTBEAT_INTERVAL_S),
        LAFTER_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_TIMEOUT_S),
        LAFTER_REAPER_INTERVAL_S=str(REAPER_INTERVAL_S),
        LAFTER_MAX_JOB_ATTEMPTS=str(MAX_ATTEMPTS),
        LAFTER_MAX_ACTIVE_JOBS_PER_OWNER=str(CAP),
        LAFTER_CHECKPOINT_EVERY_S="0.5",
        LAFTER_PROGRESS_WRITE_INTERVAL_S="0",  # the row's step follows every training step
        # LAFTER_CANCEL_POLL_INTERVAL_S stays at its default (1 s): a cancel must not wait for it.
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
    )
    migrate = run("alembic", ["upgrade", "head"], env=env)
    assert migrate.returncode == 0, migrate.stderr
    engine = sa.create_engine(db_url)
    st = Stack(root=root, db_url=db_url, redis_port=redis_port, env=env, engine=engine)
    st.url = f"http://127.0.0.1:{free_port()}"
    try:
        st.start_redis()
        booting = st.boot_worker()  # the two slow starts overlap
        st.start_api()
        booting.join()
        yield st
    except BaseException:
        print(st.tail(), file=sys.stderr)
        raise
    finally:
        for client in st.clients:
            client.close()
        for proc in [*st.workers, st.redis_proc]:  # nothing left in them is worth a clean stop
            if proc is not None and proc.poll() is None:
                proc.kill()
        if st.api is not None:
            st.api.terminate()
        for proc in [p for p in (st.api, *st.workers, st.redis_proc) if p is not None]:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        engine.dispose()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """On a failing stack test, show the tail of the stack's logs."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "stack" in getattr(item, "fixturenames", ()):
        st = item.funcargs.get("stack")  # type: ignore[attr-defined]
        if isinstance(st, Stack):
            report.sections.append(("stack logs", st.tail()))
