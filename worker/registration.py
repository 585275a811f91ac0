"""The last stage: the served model and its artifact become rows, and the job succeeds, in one
transaction fenced by the attempt number."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.core.ids import new_id
from app.jobs.tables import Job
from app.models.tables import Model, ModelArtifact
from lafter.artifact import AdaptedModel
from worker.reporter import JobReporter
from worker.transitions import finish


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
        row = session.scalar(select(Job).where(Job.id == job.id).with_for_update())
        if row is None or row.attempts != job.attempts:
            return "skipped"  # the job was given to another attempt while this one worked
        if row.status != "running":
            # Asked to cancel (or finished elsewhere) while we worked: honour it, register nothing.
            if row.status == "cancelling":
                finish(session, row, "cancelled", message="cancelled before the model was registered")
                session.commit()
                return "cancelled"
            return "skipped"
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
        finish(session, row, "succeeded", message=f"registered model {model.id} ({outcome.served.kind})")
        session.commit()
    return "succeeded"
