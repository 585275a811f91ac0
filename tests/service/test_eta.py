"""A job's ETA comes from the measured rate of its current stage and the steps
left, and does not grow while the job runs at a steady rate. No database: the reporter writes into
a stand-in session, on a stand-in clock."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import pytest

import worker.reporter as reporter_module
from lafter.progress import ProgressEvent
from worker.reporter import EtaEstimator, JobReporter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeSession:
    """Records the ``eta_seconds`` of each progress UPDATE; answers the event counter's UPDATE."""

    def __init__(self, written: list[float | None]) -> None:
        self.written = written

    def __enter__(self) -> FakeSession:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def execute(self, stmt: Any) -> Any:
        params = stmt.compile().params
        if "eta_seconds" in params:
            self.written.append(params["eta_seconds"])
        return SimpleNamespace(scalar_one=lambda: 1, rowcount=1)

    def add(self, _row: object) -> None:
        return None

    def commit(self) -> None:
        return None


def run_job(clock: Clock, adapt_steps: int, adapt_s_per_step: float) -> list[tuple[int, float | None]]:
    """A job as the pipeline reports it: stages 0 and 1 quickly, then stage 2 at a steady rate.
    Returns (stage-2 step, ETA written then)."""
    written: list[float | None] = []
    reporter = JobReporter("job_x", lambda: FakeSession(written), attempt=1, write_interval_s=0.0)  # type: ignore[arg-type,return-value]
    reporter.start_stage("describing")
    clock.advance(2.0)
    reporter(ProgressEvent("describing", 2, 2))
    reporter.start_stage("encoding_text")
    clock.advance(3.0)
    reporter(ProgressEvent("encoding_text", 1, 1))
    reporter.start_stage("training_text_classifier")
    for step in range(1, 201):
        clock.advance(0.01)
        reporter(ProgressEvent("training_text_classifier", step, 200))
    reporter.start_stage("adapting")
    clock.advance(2.0)  # decoding images before the first step
    out = []
    for step in range(1, adapt_steps + 1):
        clock.advance(adapt_s_per_step)
        before = len(written)
        reporter.step(step, adapt_steps)
        out.append((step, written[-1] if len(written) > before else None))
    return out


def test_eta_shrinks_at_a_steady_rate_and_matches_the_remainder(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(reporter_module, "time", SimpleNamespace(monotonic=clock))
    total, rate = 1000, 0.3
    etas = run_job(clock, total, rate)
    # The case once reported: step 85 said 29 s, step 207 said 63 s, with ~6 min left.
    by_step = dict(etas)
    for step in (85, 207, 500, 900):
        eta = by_step[step]
        assert eta is not None
        assert eta == pytest.approx((total - step) * rate, rel=0.02), (step, eta)
    known = [eta for step, eta in etas if eta is not None and step >= 2]
    assert all(b <= a for a, b in itertools.pairwise(known)), "the ETA grew at a steady rate"


def test_estimator_rules() -> None:
    clock = Clock()
    eta = EtaEstimator(clock=clock)
    # Before stage 2 its step count is unknown: no ETA rather than a wrong one.
    eta.observe("training_text_classifier", 10, 100)
    clock.advance(1.0)
    eta.observe("training_text_classifier", 20, 100)
    assert eta.estimate() is None
    # Stage 2: no rate from a single point (the time before its first step is not a step).
    clock.advance(5.0)
    eta.observe("adapting", 0, 50)
    assert eta.estimate() is None
    clock.advance(1.0)
    eta.observe("adapting", 1, 50)
    assert eta.estimate() is None
    clock.advance(2.0)
    eta.observe("adapting", 3, 50)
    assert eta.estimate() == pytest.approx(47 * 1.0)
    # A resumed stage 2 (from a checkpoint at step 30) measures from where it resumed.
    resumed = EtaEstimator(clock=clock)
    resumed.observe("adapting", 30, 50)
    clock.advance(4.0)
    resumed.observe("adapting", 32, 50)
    assert resumed.estimate() == pytest.approx(18 * 2.0)
    # After stage 2 the short stages left are not counted: the ETA is what stage 2 leaves, 0 at its end.
    clock.advance(2.0)
    resumed.observe("adapting", 50, 50)
    assert resumed.estimate() == pytest.approx(0.0)
