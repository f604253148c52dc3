"""The review page's two buttons: re-send a job's results, re-run its inference. Both audited by user.

Each action writes its audit event (actor ``<user>@<host>:<pid>:web``) before
queueing the task by name, like ``gvr resend``: the page never builds or sends
DICOM itself. ``rerun_job`` is the one place to swap for the shared ``gvr rerun``
code once that exists.
"""

from __future__ import annotations

from celery import Celery

from node.audit.db import AuditDB, actor_name, add_event
from node.audit.models import Job, JobState, utcnow
from node.celery_app import QUEUE_DICOM, TASK_DELIVER, enqueue_analysis

RESENDABLE = (JobState.INFERRED, JobState.FAILED, JobState.SENT)
RERUNNABLE = (JobState.INFERRED, JobState.FAILED, JobState.SENT)


class ActionRefused(ValueError):
    """The job cannot take this action now; the message says why, for the page."""


def web_actor(user: str) -> str:
    return f"{user}@{actor_name('web')}"


def resend_job(audit: AuditDB, app: Celery, job_id: str, user: str) -> str:
    """Queue the delivery of the job's SC and SR again; returns what the page tells the user."""
    with audit.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise ActionRefused(f"job {job_id} does not exist")
        if job.state not in RESENDABLE:
            raise ActionRefused(f"job {job_id} is {job.state.value}: it has no results to send yet")
        add_event(session, "job.resend_requested", ("job", job_id), web_actor(user),
                  f"re-send requested by {user} on the review page", {"state": job.state.value})  # fmt: skip
    app.send_task(TASK_DELIVER, args=[job_id], queue=QUEUE_DICOM)
    return f"delivery of job {job_id} queued on {QUEUE_DICOM!r}"


def rerun_job(audit: AuditDB, app: Celery, job_id: str, user: str) -> str:
    """Put the job back to QUEUED and on the ``gpu`` queue, as the assembler does for a new one.

    ``enqueued_at`` is set only once the broker took the message: if it did not,
    the node's loop finds the job QUEUED and unsent and publishes it itself.
    """
    with audit.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise ActionRefused(f"job {job_id} does not exist")
        if job.state not in RERUNNABLE:
            raise ActionRefused(f"job {job_id} is {job.state.value}: it is already waiting for or in inference")
        before = job.state.value
        job.state, job.error, job.attempts = JobState.QUEUED, None, 0
        job.enqueued_at = job.started_at = job.finished_at = None
        add_event(session, "job.rerun_requested", ("job", job_id), web_actor(user),
                  f"re-run requested by {user} on the review page", {"previous_state": before})  # fmt: skip
    enqueue_analysis(app, job_id)
    with audit.session() as session:
        job = session.get(Job, job_id)
        if job is not None and job.enqueued_at is None:
            job.enqueued_at = utcnow()
    return f"job {job_id} queued for inference again"
