"""The redelivery cap: a job whose worker died MAX_JOB_ATTEMPTS times must end FAILED, not run again.

acks_late + reject_on_worker_lost put a job whose worker was killed (GPU out of
memory, SIGKILL) back on the queue; without a cap a job that kills every worker
loops for ever. The task counts its starts in ``Job.attempts``; here the job
already has ``MAX_JOB_ATTEMPTS`` of them (as after three dead workers) and one
more delivery of its message arrives.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import update

from inference.bundle import load_bundle
from inference.tasks import WorkerContext, run_analysis
from node.audit.db import AuditDB
from node.audit.models import Job, JobState
from node.celery_app import MAX_JOB_ATTEMPTS, attempts_exhausted
from node.config import load_settings
from node.spool import Spool
from tests.inference.jobs import create_job, spool_phantoms


def test_attempts_exhausted_at_the_cap() -> None:
    """The cap's arithmetic: below it a job may start again, at it not."""
    assert not attempts_exhausted(MAX_JOB_ATTEMPTS - 1)
    assert attempts_exhausted(MAX_JOB_ATTEMPTS)


def test_job_redelivered_after_cap_ends_failed(tmp_path: Path, bundle_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A job RUNNING with MAX_JOB_ATTEMPTS starts behind it is marked FAILED on its next delivery."""
    for name in [n for n in os.environ if n.startswith("GVR_")]:
        monkeypatch.delenv(name)
    settings = load_settings(data_dir=tmp_path / "data", bundle_dir=bundle_dir)
    spool = Spool(settings.spool_dir)
    job_id = create_job(settings.audit_url, spool, spool_phantoms(spool, [3]))
    audit = AuditDB(settings.audit_url)
    with audit.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(state=JobState.RUNNING,
                                                                    attempts=MAX_JOB_ATTEMPTS))  # fmt: skip
    context = WorkerContext(settings, audit, spool, load_bundle(bundle_dir), "test:1:worker")
    delivered: list[str] = []
    try:
        run_analysis(context, job_id, delivered.append)
        with audit.session() as session:
            job = session.get(Job, job_id)
            assert job is not None
            state, attempts = job.state, job.attempts
    finally:
        audit.dispose()
    assert state == JobState.FAILED and attempts == MAX_JOB_ATTEMPTS and delivered == []
