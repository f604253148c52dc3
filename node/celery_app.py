"""The Celery application shared by the node (producer) and the workers.

The node only sends tasks by name, so it never imports the inference code (nor
torch). Workers build the same app with their task modules included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery

from node.config import Settings

TASK_ANALYZE = "inference.analyze_study"
TASK_DELIVER = "node.deliver_results"
QUEUE_GPU = "gpu"
QUEUE_DICOM = "dicom"

# -- issue 6: production limits ------------------------------------------------------------
# Default time limits (prefork pool only); a task may set its own. The hard limit must stay
# below Redis's visibility timeout, or Redis hands a still-running job to a second worker.
TASK_SOFT_TIME_LIMIT_S = 1500
TASK_TIME_LIMIT_S = 1800
REDIS_VISIBILITY_TIMEOUT_S = 3600
SQL_BROKER_POLL_S = 0.1
# The redelivery cap (a job that kills every worker) lives with the leases: node.job_lease.


def job_id_argument(args: Any, kwargs: Any) -> str:
    """The job id a task hook was called with (tasks take ``job_id`` first, by position or name)."""
    return str(args[0]) if args else str((kwargs or {}).get("job_id"))


def make_celery(settings: Settings, include: tuple[str, ...] = ()) -> Celery:
    """Build the app for these settings (no global app: tests run several side by side)."""
    broker = settings.celery_broker_url
    if broker.startswith("sqla+sqlite:///"):
        Path(broker.removeprefix("sqla+sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    app = Celery("gvr", broker=broker, include=list(include), set_as_current=False)
    app.conf.update(_conf(settings))
    if broker.startswith("sqla+"):
        _poll_sql_broker_often()
    if broker.startswith(("redis://", "rediss://")):
        # Redis redelivers an unacknowledged job after this; keep it above the longest job.
        app.conf.broker_transport_options = {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S}
        # issue 6: workers send task events for Flower (`gvr monitor`); they need Redis's pub/sub
        app.conf.worker_send_task_events = True
    return app


def _poll_sql_broker_often() -> None:
    """The server-less broker is polled, by default once a second: up to a second of waiting per hop
    (gpu, then dicom) in every study's turnaround. One SELECT every 0.1 s is cheap.

    kombu reads ``polling_interval`` from the transport options, but its SQLAlchemy transport also
    hands every option to ``create_engine``, which refuses it; the class attribute is the way left.
    """
    from kombu.transport import sqlalchemy as sql_transport

    sql_transport.Transport.polling_interval = SQL_BROKER_POLL_S


def _conf(settings: Settings) -> dict[str, Any]:
    return {
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": True,  # a job whose worker dies is redelivered, not lost
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,  # a GPU worker holds one job at a time
        # issue 9: a prefork child that a task left above this resident size is replaced after it
        "worker_max_memory_per_child": settings.worker_max_memory_mb * 1024,  # in KiB
        "task_soft_time_limit": TASK_SOFT_TIME_LIMIT_S,  # issue 6
        "task_time_limit": TASK_TIME_LIMIT_S,  # issue 6
        "task_routes": {TASK_ANALYZE: {"queue": QUEUE_GPU}, TASK_DELIVER: {"queue": QUEUE_DICOM}},
        "task_default_queue": QUEUE_GPU,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
    }


# A broker that hiccups gets a few quick retries; one that is down raises, and the audit DB keeps
# the job unpublished for the node's assembler or reconciler to publish later.
_PUBLISH_RETRY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2}


def enqueue_analysis(app: Celery, job_id: str) -> None:
    """Put one job on the ``gpu`` queue; raises if the broker cannot take it."""
    app.send_task(TASK_ANALYZE, args=[job_id], queue=QUEUE_GPU, retry=True, retry_policy=_PUBLISH_RETRY)


def enqueue_delivery(app: Celery, job_id: str) -> None:
    """Put one INFERRED job on the ``dicom`` queue; raises if the broker cannot take it."""
    app.send_task(TASK_DELIVER, args=[job_id], queue=QUEUE_DICOM, retry=True, retry_policy=_PUBLISH_RETRY)
