"""The last stage: the served model and its artifact become rows, and the job succeeds, in one
transaction fenced by the attempt number."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.core.ids import new_id
from app.jobs.tables import Job, JobStatus
from app.jobs.transitions import finish, live_attempt
from app.models.tables import Model, ModelArtifact
from lafter.artifact import AdaptedModel
from worker.reporter import JobReporter


@dataclass
class Outcome:
    """What a run produced for registration."""

    served: AdaptedModel
    metrics: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    hyperparameters: dict[str, Any] = field(default_factory=dict)


def register(job: Job, outcome: Outcome, sessions: sessionmaker[Session], reporter: JobReporter) -> str:
    reporter.start_stage("registering")
    data = outcome.served.to_bytes()
    checksum = outcome.served.checksum
    with sessions() as session:
        row = live_attempt(session, job.id, job.attempts)
        if row is None:
            return "skipped"  # the job was given to another attempt while this one worked
        if row.status == JobStatus.CANCELLING:
            # Asked to cancel while we worked: honour it, register nothing.
            finish(session, row, JobStatus.CANCELLED, message="cancelled before the model was registered")
            session.commit()
            return "cancelled"
        model = Model(
            id=new_id("model"),
            owner_id=row.owner_id,
            job_id=row.id,
            base_model=outcome.served.base_spec,
            class_names=list(outcome.served.class_names),
            kind=outcome.served.kind,
            checksum=checksum,
            size_bytes=len(data),
            num_parameters=outcome.served.num_parameters,
            metrics=outcome.metrics,
            evaluation=outcome.evaluation,
            warnings=outcome.warnings,
            metadata_={"descriptions_source": outcome.served.metadata.get("descriptions_source")},
        )
        session.add(model)
        session.flush()
        session.add(ModelArtifact(model_id=model.id, data=data, checksum=checksum))
        row.model_id = model.id
        row.metrics = outcome.metrics
        row.warnings = outcome.warnings
        row.hyperparameters = outcome.hyperparameters
        row.stage = "registering"
        row.percent = 100.0
        row.stage_percent = 100.0
        finish(
            session, row, JobStatus.SUCCEEDED, message=f"registered model {model.id} ({outcome.served.kind})"
        )
        session.commit()
    return "succeeded"
