"""The real thing for the service tests: a fresh Postgres database made by ``alembic upgrade head``,
a dedicated Redis database as the broker, a Celery worker process and a uvicorn API process,
talking over HTTP. Only the language model is a stand-in (a real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import sqlalchemy as sa

from tests.lafter.fake_llm import FakeLLMServer
from tests.launcher import launch, run
from tests.service.helpers import (
    TINY_CONFIG,
    bearer,
    free_port,
    operator_key,
    scratch_database,
    start_api,
    wait_for,
    wait_http,
)


def _redis_url() -> str:
    """The broker database of this test process: ``LAFTER_TEST_REDIS_URL`` (default db 13), and under
    pytest-xdist one database per worker below it (gw0: 13, gw1: 12, ...), since each worker starts
    its own stack and two stacks on one broker database would take each other's jobs."""
    base = os.environ.get("LAFTER_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    if worker == 0:
        return base
    prefix, _, db = base.rpartition("/")
    return f"{prefix}/{int(db) - worker}"


REDIS_URL = _redis_url()

OWNER = "tester"  # the owner of the key ``Service.client`` sends

# Small limits so the "too large" paths are cheap to hit.
MAX_FILE_BYTES = 300_000
MAX_REQUEST_BYTES = 2_000_000
MIN_IMAGES = 8


@dataclass
class Service:
    url: str
    client: httpx.Client
    engine: sa.Engine
    env: dict[str, str]
    storage_dir: Path
    llm: FakeLLMServer
    logs: Path
    root: Path
    key: str  # an API key of OWNER, made with ``python -m app keys create``

    def client_for(self, key: str | None) -> httpx.Client:
        """Another client of the same API: another owner's key, or none at all."""
        return httpx.Client(base_url=self.url, timeout=60, headers=bearer(key) if key else None)

    def count(self, table: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())

    def blob_count(self) -> int:
        return sum(1 for p in self.storage_dir.rglob("*") if p.is_file())


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    with scratch_database("lafter_test") as url:
        yield url


@pytest.fixture(scope="session")
def redis_broker() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is needed at {REDIS_URL} (run .ci/run, which starts it): {exc}")
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


@pytest.fixture(scope="session")
def fake_llm() -> Iterator[FakeLLMServer]:
    server = FakeLLMServer().start()
    yield server
    server.stop()


def _local_model(folder: Path) -> None:
    """A deployment-registered local model: an architecture JSON beside its checkpoint."""
    import json

    import open_clip
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads(TINY_CONFIG.read_text())
    (folder / "tiny-local.json").write_text(json.dumps(config))
    torch.manual_seed(1)
    model = open_clip.CLIP(**config)
    torch.save({"state_dict": model.state_dict()}, folder / "tiny-local.pt")


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@pytest.fixture(scope="session")
def service(
    pg_database: str, redis_broker: str, fake_llm: FakeLLMServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("service")
    storage = root / "blobs"
    logs = root / "logs"
    logs.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "LAFTER_ENV": "test",
        "LAFTER_AUTH": "on",
        "LAFTER_DATA_DIR": str(root),
        "LAFTER_DATABASE_URL": pg_database,
        "LAFTER_BROKER_URL": redis_broker,
        "LAFTER_STORAGE_DIR": str(storage),
        "LAFTER_ALLOW_RANDOM_WEIGHTS": "true",
        "LAFTER_MIN_IMAGES_PER_JOB": str(MIN_IMAGES),
        "LAFTER_MAX_FILE_BYTES": str(MAX_FILE_BYTES),
        "LAFTER_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
        "LAFTER_DEVICE": "cpu",
        "LAFTER_API_DEVICE": "cpu",
        "LAFTER_TORCH_THREADS": "1",
        "LAFTER_CANCEL_POLL_INTERVAL_S": "0.1",
        "LAFTER_PROGRESS_WRITE_INTERVAL_S": "0.1",
        "LAFTER_EVENTS_HEARTBEAT_S": "0.5",  # event streams: heartbeats a test can wait for
        "LAFTER_EVENTS_POLL_INTERVAL_S": "0.1",
        "LAFTER_LLM_BASE_URL": fake_llm.base_url,
        "LAFTER_LLM_MODEL": "fake-model",
        # The allow-list of base models: the deployment's folder, and the tests' tiny architecture
        # (TINY_SPEC is tests/assets/tiny-vit.json::random).
        "LAFTER_LOCAL_MODEL_DIRS": f"{root / 'models'},{TINY_CONFIG.parent}",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",  # a fuzzed job naming a pretrained tag must fail at once, not download
        # Webhooks: the tests' receivers listen on 127.0.0.1, and retries come fast.
        "LAFTER_WEBHOOK_ALLOW_PRIVATE": "true",
        "LAFTER_WEBHOOK_RETRY_DELAYS_S": "0.3,0.3,0.3",
        "LAFTER_WEBHOOK_TIMEOUT_S": "2",
        "LAFTER_WEBHOOK_POLL_INTERVAL_S": "0.2",
    }
    _local_model(root / "models")
    # The schema is made the production way: the alembic command line.
    migrate = run("alembic", ["upgrade", "head"], env=env)
    assert migrate.returncode == 0, migrate.stderr
    key = operator_key(env, OWNER, name="pytest")

    worker_log = logs / "worker.log"
    api_log = logs / "api.log"
    worker = launch(
        "celery",
        ["-A", "worker.celery_app", "worker", "--pool=solo", "-Q", "gpu", "--loglevel=INFO", "--without-gossip",
         "--without-mingle", "--without-heartbeat", "--hostname", f"test-{uuid.uuid4().hex[:6]}@%h"],
        env=env, log=worker_log,
    )  # fmt: skip
    api = start_api(env, api_log, port)
    url = f"http://127.0.0.1:{port}"
    engine = sa.create_engine(pg_database)
    try:
        wait_http(f"{url}/healthz", timeout=180, proc=api)  # imports take a minute on 2 busy cores
        wait_for(
            lambda: "ready." in worker_log.read_text(errors="replace"), 60, 0.3, "the worker to be ready"
        )
        with httpx.Client(base_url=url, timeout=60, headers=bearer(key)) as client:
            yield Service(url, client, engine, env, storage, fake_llm, logs, root, key)
    except BaseException:
        print("---- api log ----\n" + _tail(api_log), file=sys.stderr)
        print("---- worker log ----\n" + _tail(worker_log), file=sys.stderr)
        raise
    finally:
        for proc in (api, worker):
            proc.terminate()
        for proc in (api, worker):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        engine.dispose()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """On a failing service test, show the tail of the API and worker logs."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "service" in getattr(item, "fixturenames", ()):
        svc = item.funcargs.get("service")  # type: ignore[attr-defined]
        if isinstance(svc, Service):
            for name in ("api.log", "worker.log"):
                report.sections.append((name, _tail(svc.logs / name)))
