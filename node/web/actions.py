"""The review page's two buttons: re-send a job's results, re-run its inference. Both audited by user.

The page never builds or sends DICOM itself: both buttons use the same code as
``gvr resend`` and ``gvr rerun`` (``node.job_commands``), with the logged-in
user in the audit event's actor (``<user>@<host>:<pid>:web``).
"""

from __future__ import annotations

from celery import Celery

from node.audit.db import AuditDB, actor_name
from node.config import Settings
from node.job_commands import RERUNNABLE, RESENDABLE, JobActionRefused
from node.job_commands import rerun_job as _rerun
from node.job_commands import resend_job as _resend
from node.spool import Spool

__all__ = ["RERUNNABLE", "RESENDABLE", "ActionRefused", "rerun_job", "resend_job", "web_actor"]

ActionRefused = JobActionRefused


def web_actor(user: str) -> str:
    return f"{user}@{actor_name('web')}"


def resend_job(settings: Settings, audit: AuditDB, app: Celery, job_id: str, user: str) -> str:
    """Queue the delivery of the job's SC and SR again; returns what the page tells the user."""
    return _resend(audit, app, job_id, web_actor(user))


def rerun_job(settings: Settings, audit: AuditDB, app: Celery, job_id: str, user: str) -> str:
    """Put the job back to QUEUED and on the ``gpu`` queue; returns what the page tells the user."""
    return _rerun(audit, app, Spool(settings.spool_dir, owner="web"), job_id, web_actor(user))
