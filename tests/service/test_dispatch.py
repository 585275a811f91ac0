"""``dispatch`` stamps ``enqueued_at`` on the jobs it sends, and only on them: a send the broker
refuses takes its stamp back, so the row never says "sent" for a message that does not exist. Real
brokers: an AMQP URL where nothing listens (a broker that is down), and kombu's in-memory one."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.core.db import make_engine
from app.core.migrate import upgrade_head
from app.core.settings import Settings
from app.jobs.dispatch import dispatch
from app.jobs.tables import Job, JobStatus


def _sessions(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade_head(url)
    return sessionmaker(bind=make_engine(url), expire_on_commit=False)


def _settings(tmp_path: Path, broker_url: str) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",  # type: ignore[call-arg]
                    broker_url=broker_url, max_active_jobs_per_owner=1)  # fmt: skip


def _queued(sessions: sessionmaker[Session], job_id: str, owner: str) -> None:
    with sessions() as session:
        session.add(Job(id=job_id, owner_id=owner, status=JobStatus.QUEUED, base_model="x::random",
                        class_names=["a", "b"], seed=0))  # fmt: skip
        session.commit()


def _stamp(sessions: sessionmaker[Session], job_id: str) -> object:
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.enqueued_at


def test_a_send_the_broker_refuses_leaves_the_job_unsent(tmp_path: Path) -> None:
    sessions = _sessions(tmp_path)
    _queued(sessions, "job_down", "owner-a")
    down = _settings(tmp_path, "amqp://guest:guest@127.0.0.1:1//")  # nothing listens on port 1
    with pytest.raises(Exception):  # noqa: B017  (whatever kombu raises for a refused connection)
        dispatch(sessions, down, "owner-a")
    assert _stamp(sessions, "job_down") is None  # the reaper's next pass sends it at once


def test_only_the_jobs_sent_are_stamped(tmp_path: Path) -> None:
    sessions = _sessions(tmp_path)
    for job_id in ("job_first", "job_second"):
        _queued(sessions, job_id, "owner-b")
    memory = _settings(tmp_path, "memory://")
    assert dispatch(sessions, memory, "owner-b") == ["job_first"]  # a cap of 1: the second waits
    assert _stamp(sessions, "job_first") is not None
    assert _stamp(sessions, "job_second") is None
    assert dispatch(sessions, memory, "owner-b") == []  # sent already, and no message is lost


def test_a_housekeeping_pass_leaves_a_job_created_moments_ago_to_its_creator(tmp_path: Path) -> None:
    """The reaper dispatches with a minimum age: a job whose creating request has committed but not
    yet sent it is not sent by the reaper as well (that request may send it to another queue)."""
    sessions = _sessions(tmp_path)
    _queued(sessions, "job_new", "owner-c")
    files = _settings(tmp_path, "filesystem://")  # a broker with real "message sent" markers
    assert dispatch(sessions, files, "owner-c", min_age_s=60.0) == []
    assert _stamp(sessions, "job_new") is None
    with sessions() as session:  # a minute later the creator has evidently failed to send it
        job = session.get(Job, "job_new")
        assert job is not None
        job.created_at = job.created_at - timedelta(seconds=61)
        session.commit()
    assert dispatch(sessions, files, "owner-c", min_age_s=60.0) == ["job_new"]
