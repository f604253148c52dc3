"""The Celery app of a worker: the node's app plus the task modules this install has.

``node.delivery`` (the ``dicom`` queue) is included when it is importable, so one
``gvr worker --queues gpu,dicom`` serves both queues on a single machine.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from typing import Any

from celery import Celery
from sqlalchemy import select

from node.audit.db import AuditDB, actor_name, add_event
from node.audit.models import Job, JobState
from node.celery_app import QUEUE_GPU, TASK_ANALYZE, make_celery
from node.config import Settings

logger = logging.getLogger(__name__)

TASK_MODULES = ("inference.tasks", "node.delivery")
RATIONALE_CONF_KEY = "gvr_rationale"  # app.conf key: RationaleConfig fields the task uses


def available_task_modules() -> tuple[str, ...]:
    return tuple(name for name in TASK_MODULES if importlib.util.find_spec(name) is not None)


def make_worker_app(settings: Settings, visibility_timeout: float | None = None,
                    rationale: dict[str, Any] | None = None) -> Celery:
    """The app for ``gvr worker``.

    ``visibility_timeout`` (seconds; Redis only) is how long an unacknowledged job
    waits before Redis hands it to another worker: a job whose worker was killed
    is redone after it. Keep it above the longest job (the default is 3600 s).
    ``rationale`` holds RationaleConfig fields the task uses instead of defaults.

    Raises:
        ValueError: a visibility timeout <= 0.
    """
    app = make_celery(settings, include=available_task_modules())
    if visibility_timeout is not None:
        if not visibility_timeout > 0:
            raise ValueError(f"visibility_timeout must be > 0 seconds, got {visibility_timeout!r}")
        if settings.celery_broker_url.startswith(("redis://", "rediss://")):
            interval = max(1, int(visibility_timeout // 2))
            app.conf.broker_transport_options = {
                "visibility_timeout": visibility_timeout,
                "unacked_restore_interval": interval,  # look for abandoned jobs this often
                "unacked_restore_throttle": 1,
            }
    if rationale:
        app.conf[RATIONALE_CONF_KEY] = dict(rationale)
    return app


def redelivers_lost_jobs(broker_url: str) -> bool:
    """True for brokers that hand an unacknowledged job to another worker (Redis: visibility timeout)."""
    return broker_url.startswith(("redis://", "rediss://", "amqp://", "amqps://", "pyamqp://"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def requeue_orphaned_jobs(settings: Settings, app: Celery) -> list[str]:
    """Re-send RUNNING jobs whose worker process on *this host* is gone; returns their ids.

    The server-less broker (kombu's SQLAlchemy transport) forgets a message once a
    worker took it, so a worker killed mid-job (SIGKILL, power cut) would leave the
    job RUNNING for ever. A worker starting on the same host finds such jobs by
    the actor recorded in the audit DB (``host:pid:worker``, pid no longer alive)
    and queues them again; the task's idempotence makes a spurious re-send
    harmless. Brokers that redeliver by themselves are left to do so.
    """
    if redelivers_lost_jobs(settings.celery_broker_url):
        return []
    host = socket.gethostname()
    audit = AuditDB(settings.audit_url)
    requeued: list[str] = []
    try:
        with audit.session() as session:
            running = session.scalars(select(Job).where(Job.state == JobState.RUNNING)).all()
            for job in running:
                parts = (job.worker or "").rsplit(":", 2)
                if len(parts) != 3 or parts[0] != host or not parts[1].isdigit() or _pid_alive(int(parts[1])):
                    continue
                app.send_task(TASK_ANALYZE, args=[job.id], queue=QUEUE_GPU)
                add_event(session, "job.requeued", ("job", job.id), actor_name("worker"),
                          f"its worker {job.worker} is gone; sent to queue {QUEUE_GPU} again")
                requeued.append(job.id)
    finally:
        audit.dispose()
    for job_id in requeued:
        logger.warning("job %s was RUNNING on a worker that is gone: re-queued", job_id)
    return requeued
