"""What a person can do to a job: run its inference again, or deliver its results again.

Shared by ``gvr rerun``, ``gvr resend`` and the review page's buttons. Each one
checks that the transition makes sense (no such job, or a job a worker holds
right now, is refused with a sentence), writes its audit event with the person's
name as actor, resets the job's phase in the audit DB (``node.job_lease``) and
publishes the task. If the broker cannot take the message, the job is still in
the right state: the node's reconciler or assembler publishes it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

from celery import Celery

from node.audit.db import AuditDB, add_event
from node.audit.models import Job, JobState, as_utc, utcnow
from node.celery_app import enqueue_analysis, enqueue_delivery
from node.job_lease import start_phase
from node.results.build import outbox_folder
from node.spool import Spool

RESENDABLE = (JobState.INFERRED, JobState.FAILED, JobState.SENT)
RERUNNABLE = (JobState.QUEUED, JobState.RUNNING, JobState.INFERRED, JobState.FAILED, JobState.SENT)


class JobActionRefused(ValueError):
    """The job cannot take this action now; the message says why and what to do instead."""


def _held_by_a_worker(job: Job) -> str | None:
    """Who holds the job right now (a live lease), or None."""
    if job.lease_expires_at is not None and as_utc(job.lease_expires_at) > utcnow():
        return job.worker or "a worker"
    return None


def rerun_job(audit: AuditDB, app: Celery, spool: Spool, job_id: str, actor: str) -> str:
    """Run job ``job_id``'s inference again: QUEUED, counts reset, its old outbox removed, published.

    The result UIDs derive from the job and its sources, so a re-run whose output
    is the same sends the same SOP instances (a PACS keeps one copy).
    """
    with audit.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobActionRefused(f"there is no job {job_id} in the audit database (gvr audit lists the jobs)")
        holder = _held_by_a_worker(job)
        if holder is not None:
            raise JobActionRefused(f"job {job_id} is {job.state.value} on {holder} right now; "
                                   "wait for it to finish, then run it again")  # fmt: skip
        before = job.state.value
        start_phase(job, JobState.QUEUED)
        job.attempts, job.error, job.started_at, job.finished_at, job.result = 0, None, None, None, None
        add_event(session, "job.rerun_requested", ("job", job_id), actor,
                  f"inference run again on request (was {before})", {"previous_state": before})  # fmt: skip
    shutil.rmtree(outbox_folder(spool, job_id), ignore_errors=True)  # rebuilt from the new result
    return _publish(audit, job_id, lambda: enqueue_analysis(app, job_id),
                    f"job {job_id} queued for inference again on 'gpu'")  # fmt: skip


def resend_job(audit: AuditDB, app: Celery, job_id: str, actor: str) -> str:
    """Deliver job ``job_id``'s results again through the ``dicom`` queue (INFERRED, FAILED with results, SENT).

    Objects a destination already acknowledged are not sent again (per-object
    Delivery rows); a job whose inference never finished is refused.
    """
    with audit.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobActionRefused(f"there is no job {job_id} in the audit database (gvr audit lists the jobs)")
        if job.state not in RESENDABLE:
            raise JobActionRefused(f"job {job_id} is {job.state.value}: it has no results to send yet "
                                   f"(wait for it, or run it again with: gvr rerun {job_id})")  # fmt: skip
        holder = _held_by_a_worker(job)
        if holder is not None:
            raise JobActionRefused(f"job {job_id} is being delivered by {holder} right now")
        before = job.state.value
        start_phase(job, JobState.INFERRED)
        job.error = None
        add_event(session, "job.resend_requested", ("job", job_id), actor,
                  f"delivery sent again on request (was {before})", {"previous_state": before})  # fmt: skip
    return _publish(audit, job_id, lambda: enqueue_delivery(app, job_id),
                    f"delivery of job {job_id} queued on 'dicom'")  # fmt: skip


def _publish(audit: AuditDB, job_id: str, send: Callable[[], None], done: str) -> str:
    """Publish; mark the job published only once the broker took the message."""
    try:
        send()
    except Exception as error:  # noqa: BLE001 - kombu, redis: the node publishes the job itself later
        return f"job {job_id}: the broker did not take it now ({type(error).__name__}); the node will publish it"
    with audit.session() as session:
        job = session.get(Job, job_id)
        if job is not None and job.enqueued_at is None:
            job.enqueued_at = utcnow()
    return done
