"""Jobs survive crashed workers and a restarted broker: real worker processes killed with SIGKILL, a
real redis-server killed and started again, the reaper of a real API process."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from app.core.db import make_engine, utcnow
from app.jobs.reaper import reap
from app.jobs.tables import Job, JobEvent
from tests.service.helpers import TINY_HP, png, wait_for

if TYPE_CHECKING:
    from tests.service.fixtures_worker import Stack, Tenant

pytest_plugins = ["tests.service.fixtures_worker"]

# 200 steps of ~30 ms: long enough to be killed mid-way, short enough to finish after a resume.
RESUMABLE_HP = {**TINY_HP, "epochs": 1000, "max_steps": 200}


def _left_running(stack: Stack, tenant: Tenant, job_id: str, attempt: int) -> dict[str, Any]:
    """Wait until the reaper took the job away from the dead attempt (re-queued, or final)."""
    return tenant.wait(
        job_id,
        lambda j: j["attempts"] > attempt or j["status"] not in ("running", "cancelling"),
        stack.reap_bound_s,
        f"the reaper to notice attempt {attempt}'s worker is gone",
    )


def _checkpoints(tenant: Tenant, job_id: str) -> list[int]:
    return [
        e["data"]["checkpoint_step"] for e in tenant.events(job_id) if "checkpoint_step" in (e["data"] or {})
    ]


def test_sigkill_mid_training_resumes_from_the_checkpoint(stack: Stack) -> None:
    tenant = stack.tenant("crash-resume")
    stack.ensure_worker()
    job = tenant.submit(hyperparameters=RESUMABLE_HP, seed=11)
    tenant.wait_training(job["id"], min_step=25)
    wait_for(lambda: _checkpoints(tenant, job["id"]), 30, 0.1, "a first checkpoint")
    saved_before_kill = max(_checkpoints(tenant, job["id"]))

    stack.kill_worker(stack.worker_of(job["id"]))
    killed_at = time.monotonic()
    replacement = stack.boot_worker()  # boots while the reaper waits out the heartbeat timeout
    requeued = _left_running(stack, tenant, job["id"], attempt=1)
    assert time.monotonic() - killed_at < stack.reap_bound_s
    assert requeued["status"] in ("queued", "running")
    replacement.join()

    done = tenant.wait_final(job["id"])
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    resumed = done["metrics"]["adapting"]["resumed_from_step"]
    assert resumed >= saved_before_kill > 0  # not from scratch
    assert done["metrics"]["adapting"]["steps"] == done["hyperparameters"]["total_steps"] == 200
    # The finished stages were not recomputed: text embeddings from the database cache (template
    # descriptions need no cache), the stage-1 head from the checkpoint.
    embeddings = done["metrics"]["cache"]["embeddings"]
    assert embeddings["misses"] == 0 and embeddings["hits"] > 0
    messages = [e["message"] or "" for e in tenant.events(job["id"])]
    assert any("stopped answering" in m and "attempt 2 of 2" in m for m in messages), messages
    assert any(
        m.startswith(f"attempt 2: resuming from the checkpoint at stage-2 step {resumed}") for m in messages
    )
    assert "restored the text classifier from the checkpoint" in messages
    checkpoint = stack.storage_dir / "jobs" / job["id"] / "checkpoint.pt"
    wait_for(lambda: not checkpoint.exists(), 10, 0.1, "the checkpoint to be deleted")
    r = tenant.client.post(f"/v1/models/{done['model_id']}/classify", files=[("files", ("a.png", png(4242)))])
    assert r.status_code == 200, r.text


def test_a_job_whose_workers_keep_dying_fails_with_worker_lost(stack: Stack) -> None:
    assert stack.max_attempts == 2
    tenant = stack.tenant("crash-twice")
    stack.ensure_worker()
    standby = stack.boot_worker()  # boots during attempt 1, runs (and dies in) attempt 2
    job = tenant.submit(hyperparameters=stack.long_hp)
    for attempt in (1, 2):
        tenant.wait(
            job["id"],
            lambda j, a=attempt: (
                j["attempts"] == a and j["stage"] == "adapting" and j["progress"]["step"] > 0
            ),
            90,
            f"attempt {attempt} training",
        )
        if attempt == 1:
            standby.join()
        stack.kill_worker(stack.worker_of(job["id"]))
        killed_at = time.monotonic()
        after = _left_running(stack, tenant, job["id"], attempt)
        assert time.monotonic() - killed_at < stack.reap_bound_s
    failed = tenant.wait_final(job["id"], timeout=10)
    assert after["status"] == failed["status"] == "failed"
    assert failed["attempts"] == stack.max_attempts and failed["model_id"] is None
    assert failed["error"]["code"] == "worker_lost"
    message = failed["error"]["message"]
    assert f"LAFTER_MAX_JOB_ATTEMPTS={stack.max_attempts}" in message and "batch_size" in message
    assert not (stack.storage_dir / "jobs" / job["id"] / "checkpoint.pt").exists()


def test_cancel_of_a_job_whose_worker_died_ends_cancelled(stack: Stack) -> None:
    tenant = stack.tenant("crash-cancel")
    worker = stack.ensure_worker()
    job = tenant.submit(hyperparameters=stack.long_hp)
    tenant.wait_training(job["id"])
    stack.kill_worker(worker)
    r = tenant.client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelling", r.text
    done = _left_running(stack, tenant, job["id"], attempt=1)
    assert done["status"] == "cancelled" and done["attempts"] == 1, done
    assert any("before it could stop" in (e["message"] or "") for e in tenant.events(job["id"]))


def test_a_worker_whose_job_was_handed_on_stops_and_writes_nothing(stack: Stack) -> None:
    """A worker that only looked dead (stalled past the heartbeat timeout) and comes back to find its
    job queued again must stop at once and leave the row to its next attempt."""
    from app.core.storage import LocalStorage
    from worker.pipeline import run_job

    stack.stop_workers()  # the pipeline runs in this process, as that slow worker
    tenant = stack.tenant("handed-on")
    job = tenant.submit(hyperparameters=stack.long_hp)
    engine = make_engine(stack.db_url)
    sessions = sessionmaker(bind=engine, expire_on_commit=False)
    outcome: list[str] = []
    runner = threading.Thread(
        target=lambda: outcome.append(
            run_job(job["id"], stack.settings(), sessions, LocalStorage(stack.storage_dir))
        )
    )
    try:
        runner.start()
        tenant.wait_training(job["id"], min_step=5)
        # The reaper of an API whose clock says this worker is overdue: the job is queued again.
        # (A pass skips the row while the worker's per-step write holds its lock: SKIP LOCKED.)
        impatient = stack.settings().model_copy(update={"heartbeat_timeout_s": 0.0})
        reaped = wait_for(
            lambda: [r.outcome for r in reap(sessions, impatient) if r.job_id == job["id"]],
            10,
            0.05,
            "a reaper pass to take the job",
        )
        assert reaped == ["requeued"]
        runner.join(timeout=20)
        assert outcome == ["lost"]
    finally:
        runner.join(timeout=30)
        engine.dispose()
    row = tenant.job(job["id"])
    assert row["status"] == "queued" and row["attempts"] == 1 and row["finished_at"] is None
    assert not any("cancelled" in (e["message"] or "") for e in tenant.events(job["id"]))
    assert tenant.client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"


def test_redis_restart_loses_no_queued_job(stack: Stack) -> None:
    """Queued jobs whose messages vanish with the broker are sent again from their rows."""
    stack.stop_workers()
    tenants = [stack.tenant(f"redis-{i}") for i in range(2)]
    jobs = [(t, t.submit()) for t in tenants for _ in range(2)]
    # A cap of 1 per owner: one job of each owner is in the broker, the other waits in Postgres.
    assert [stack.in_broker(j["id"]) for _, j in jobs] == [True, False, True, False]
    assert [t.job(j["id"])["queue_position"] for t, j in jobs] == [None, 1, None, 1]

    stack.redis().set("sentinel", "1")
    stack.kill_redis()
    stack.start_redis()
    # Everything is gone (the reaper may already be sending the jobs again: it runs every 0.5 s).
    assert stack.redis().get("sentinel") is None
    wait_for(
        lambda: [stack.in_broker(j["id"]) for _, j in jobs] == [True, False, True, False],
        20,
        0.2,
        "the reaper to send the lost jobs again",
    )

    stack.start_worker()
    for tenant, job in jobs:
        done = tenant.wait_final(job["id"])
        assert done["status"] == "succeeded" and done["attempts"] == 1, done


def test_duplicate_messages_do_nothing(stack: Stack) -> None:
    """A redelivered message for a finished job, or for a job another worker is running with a fresh
    heartbeat, changes nothing."""
    from celery import Celery

    from app.core.storage import LocalStorage
    from worker.pipeline import run_job

    tenant = stack.tenant("duplicates")
    stack.ensure_worker()
    finished = tenant.wait_final(tenant.submit()["id"])
    assert finished["status"] == "succeeded"
    running = tenant.submit(hyperparameters=stack.long_hp)
    tenant.wait_training(running["id"], min_step=5)

    engine = make_engine(stack.db_url)
    sessions = sessionmaker(bind=engine, expire_on_commit=False)
    try:
        before = _row(sessions, running["id"])
        # What the task does with a redelivered message, run here as a second worker would: nothing.
        for job_id in (finished["id"], running["id"]):
            assert run_job(job_id, stack.settings(), sessions, LocalStorage(stack.storage_dir)) == "skipped"
        after = _row(sessions, running["id"])
        assert (after.status, after.attempts, after.worker_id) == ("running", 1, before.worker_id)
        assert after.step >= before.step  # still training, in the other worker
    finally:
        engine.dispose()
    # And through the broker: the worker takes a duplicate of the finished job and skips it.
    Celery(broker=stack.broker_url).send_task("lafter.run_job", args=[finished["id"]], queue="gpu")
    assert tenant.client.post(f"/v1/jobs/{running['id']}/cancel").status_code == 200
    done = tenant.wait_final(running["id"])
    assert done["status"] == "cancelled" and done["attempts"] == 1
    wait_for(lambda: stack.redis().llen("gpu") == 0, 30, 0.2, "the duplicate to be consumed")
    again = tenant.job(finished["id"])
    assert again == finished


def _row(sessions: sessionmaker[Session], job_id: str) -> Job:
    with sessions() as session:
        row = session.get(Job, job_id)
        assert row is not None
        return row


def test_reaper_passes_running_at_once_handle_a_lost_job_exactly_once(stack: Stack) -> None:
    """Several API processes run the reaper: each lost job is handled by exactly one of them (here
    four passes in threads, and the stack's own API, race for one job)."""
    engine = make_engine(stack.db_url)
    sessions = sessionmaker(bind=engine, expire_on_commit=False)
    job_id = f"job_{uuid.uuid4().hex[:24]}"
    stale = utcnow() - timedelta(seconds=600)
    try:
        with sessions() as session:
            session.add(
                Job(
                    id=job_id,
                    owner_id="reaper-race",
                    status="cancelling",  # ends cancelled: nothing is sent to the stack's worker
                    stage="adapting",
                    base_model="x::y",
                    class_names=["a", "b"],
                    seed=0,
                    attempts=1,
                    worker_id="gone:1",
                    started_at=stale,
                    heartbeat_at=stale,
                    created_at=stale,
                    queued_at=stale,
                )
            )
            session.commit()
        barrier = threading.Barrier(4)
        wins: list[int] = []

        def one_pass() -> None:
            barrier.wait()
            wins.append(sum(1 for r in reap(sessions, stack.settings()) if r.job_id == job_id))

        threads = [threading.Thread(target=one_pass) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_for(lambda: _row(sessions, job_id).status == "cancelled", 10, 0.1, "the job to be reaped")
        with sessions() as session:
            events = session.query(JobEvent).filter(JobEvent.job_id == job_id).all()
        assert len(events) == 1 and "before it could stop" in (events[0].message or "")
        assert sum(wins) <= 1  # 0 when the API's own pass won
    finally:
        with sessions() as session:
            session.query(JobEvent).filter(JobEvent.job_id == job_id).delete()
            session.query(Job).filter(Job.id == job_id).delete()
            session.commit()
        engine.dispose()
