"""The Celery app of a worker: the node's app plus the task modules this install has.

``node.delivery`` (the ``dicom`` queue) is included when it is importable, so one
``gvr worker --queues gpu,dicom`` serves both queues on a single machine.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from celery import Celery

from node.celery_app import make_celery
from node.config import Settings

logger = logging.getLogger(__name__)

TASK_MODULES = {"gpu": "inference.tasks", "dicom": "node.delivery"}  # queue -> the module of its task
RATIONALE_CONF_KEY = "gvr_rationale"  # app.conf key: RationaleConfig fields the task uses


def task_modules_for(queues: list[str] | tuple[str, ...] = ("gpu", "dicom")) -> tuple[str, ...]:
    """The task modules a worker of ``queues`` imports: a delivery-only worker never imports torch."""
    return tuple(TASK_MODULES[q] for q in queues if q in TASK_MODULES and importlib.util.find_spec(TASK_MODULES[q]))


def make_worker_app(settings: Settings, visibility_timeout: float | None = None,
                    rationale: dict[str, Any] | None = None, modules: tuple[str, ...] | None = None) -> Celery:
    """The app for ``gvr worker``.

    ``visibility_timeout`` (seconds; Redis only) is how long an unacknowledged job
    waits before Redis hands it to another worker: a job whose worker was killed
    is redone after it. Keep it above the longest job (the default is 3600 s).
    ``rationale`` holds RationaleConfig fields the task uses instead of defaults.

    Raises:
        ValueError: a visibility timeout <= 0.
    """
    app = make_celery(settings, include=task_modules_for() if modules is None else modules)
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
