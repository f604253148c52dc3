"""The redelivery cap: a job whose workers died MAX_WORKER_DEATHS times ends FAILED, not run again.

A worker that dies (GPU out of memory, SIGKILL) stops renewing its job's lease;
the node's reconciler then publishes the job again. Without a cap a job that
kills every worker would loop for ever. Deaths are starts that ended neither in
a result nor in a scheduled retry (``attempts - retries``). Both ways the job
can come back are capped: the reconciler finding the expired lease, and a
worker receiving a stray copy of its message (Redis's visibility timeout).
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from inference.bundle import load_bundle
from inference.tasks import WorkerContext, run_analysis
from node.audit.db import AuditDB
from node.audit.models import Job, JobState, utcnow
from node.config import Settings, load_settings
from node.job_lease import MAX_WORKER_DEATHS
from node.reconciler import Reconciler
from node.spool import Spool
from tests.inference.jobs import create_job, spool_phantoms


def _dead_job(settings: Settings, deaths: int, retries: int = 0, seed: int = 3) -> str:
    """A job RUNNING under a lease that expired, after ``deaths + retries`` starts."""
    spool = Spool(settings.spool_dir)
    job_id = create_job(settings.audit_url, spool, spool_phantoms(spool, [seed]))
    audit = AuditDB(settings.audit_url)
    with audit.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(
            state=JobState.RUNNING, attempts=deaths + retries, retries=retries, worker="gone:1:worker",
            lease_expires_at=utcnow() - timedelta(seconds=1)))  # fmt: skip
    audit.dispose()
    return job_id


def _state(settings: Settings, job_id: str) -> Job:
    audit = AuditDB(settings.audit_url)
    try:
        with audit.session() as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job
    finally:
        audit.dispose()


@pytest.fixture
def settings(tmp_path: Path, bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in [n for n in os.environ if n.startswith("GVR_")]:
        monkeypatch.delenv(name)
    return load_settings(data_dir=tmp_path / "data", bundle_dir=bundle_dir)


def test_reconciler_fails_a_job_that_killed_every_worker(settings: Settings) -> None:
    """Expired lease after MAX_WORKER_DEATHS deaths: FAILED with the sentence and `gvr rerun`, nothing published;
    one death fewer (or the same starts with transient retries among them): published again."""
    capped = _dead_job(settings, MAX_WORKER_DEATHS)
    below = _dead_job(settings, MAX_WORKER_DEATHS - 1, retries=2, seed=4)
    published: list[str] = []
    audit = AuditDB(settings.audit_url)
    try:
        report = Reconciler(settings, audit, published.append, published.append, "test:1:node").run_once()
    finally:
        audit.dispose()
    assert report.failed == [capped] and published == [below] == report.published
    job = _state(settings, capped)
    assert job.state is JobState.FAILED and job.error is not None and job.lease_expires_at is None
    assert "each worker running this job died" in job.error and f"gvr rerun {capped}" in job.error
    assert _state(settings, below).state is JobState.QUEUED


def test_stray_message_for_a_capped_job_ends_it_failed(settings: Settings, bundle_dir: Path) -> None:
    """A copy of the message reaching a worker (Redis's visibility timeout) is capped the same way."""
    job_id = _dead_job(settings, MAX_WORKER_DEATHS)
    audit = AuditDB(settings.audit_url)
    context = WorkerContext(settings, audit, Spool(settings.spool_dir), load_bundle(bundle_dir), "test:1:worker")
    delivered: list[str] = []
    try:
        assert run_analysis(context, job_id, delivered.append) == "exhausted"
    finally:
        audit.dispose()
    job = _state(settings, job_id)
    assert job.state is JobState.FAILED and job.attempts == MAX_WORKER_DEATHS and delivered == []
