"""``gvr status``: is the node keeping up? Queue depths, live workers, recent jobs, the oldest open job.

Read-only and quick (a couple of seconds at most, whatever is down): each part
is gathered on its own, and a part that cannot be reached says why instead of
failing the whole report, so the command is useful exactly when something is
wrong. Queue depths come from the broker itself: Redis ``LLEN`` (plus the
``unacked`` hash: messages a worker holds), or the embedded SQLite broker's
``kombu_message`` table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from node.celery_app import QUEUE_DICOM, QUEUE_GPU
from node.cli.common import HelpFormatter, add_config_option, settings_from, setup_logging
from node.config import Settings

log = logging.getLogger("gvr.status")

QUEUES = (QUEUE_GPU, QUEUE_DICOM)
UNFINISHED = ("QUEUED", "RUNNING", "INFERRED")
# kombu's Redis transport keeps a priority's messages in "<queue>\x06\x16<n>" beside the plain list
_REDIS_PRIORITY_SEP = "\x06\x16"


@dataclass(frozen=True)
class QueueDepths:
    """Messages waiting per queue; ``unacked``: taken by a worker, not yet acknowledged (Redis only)."""

    broker: str
    waiting: dict[str, int] = field(default_factory=dict)
    unacked: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class Workers:
    """Workers that answered a ping within the timeout, by host name."""

    names: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class JobFigures:
    """Jobs updated within the window, by state, and the oldest job not yet SENT or FAILED."""

    window_minutes: int
    by_state: dict[str, int] = field(default_factory=dict)
    oldest_unfinished: dict[str, Any] | None = None
    error: str | None = None


@dataclass(frozen=True)
class StatusReport:
    queues: QueueDepths
    workers: Workers
    jobs: JobFigures

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        lines = [f"Broker {self.queues.broker}"]
        if self.queues.error:
            lines.append(f"  queues: unavailable ({self.queues.error})")
        else:
            for name in QUEUES:
                lines.append(f"  queue {name:<6} {self.queues.waiting.get(name, 0):>6} waiting")
            if self.queues.unacked is not None:
                lines.append(f"  taken by workers, not yet acknowledged: {self.queues.unacked}")
        if self.workers.error:
            lines.append(f"Workers: unknown ({self.workers.error})")
        else:
            lines.append(f"Workers alive: {len(self.workers.names)}")
            lines += [f"  {name}" for name in self.workers.names]
        jobs = self.jobs
        if jobs.error:
            lines.append(f"Jobs: unavailable ({jobs.error})")
            return "\n".join(lines)
        counts = ", ".join(f"{state} {count}" for state, count in sorted(jobs.by_state.items())) or "none"
        lines.append(f"Jobs updated in the last {jobs.window_minutes} min: {counts}")
        oldest = jobs.oldest_unfinished
        if oldest is None:
            lines.append("Oldest unfinished job: none")
        else:
            lines.append(
                f"Oldest unfinished job: {oldest['id']} {oldest['state']}, created {oldest['age_seconds']:.0f} s ago,"
                f" {oldest['attempts']} attempt(s)"
            )
        return "\n".join(lines)


# -- gathering -------------------------------------------------------------------------


def redacted(url: str) -> str:
    """The broker URL without a password (it is printed)."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else f"{scheme}://{user}@{host}"


def queue_depths(broker_url: str) -> QueueDepths:
    """Waiting messages per queue, read from the broker; an unreachable broker is an ``error``."""
    shown = redacted(broker_url)
    try:
        if broker_url.startswith(("redis://", "rediss://")):
            return _redis_depths(broker_url, shown)
        if broker_url.startswith("sqla+sqlite:///"):
            return _sqlite_depths(broker_url.removeprefix("sqla+sqlite:///"), shown)
    except Exception as error:  # noqa: BLE001 - redis, sqlite and socket errors alike: report, do not crash
        return QueueDepths(shown, error=f"{type(error).__name__}: {error}")
    return QueueDepths(shown, error="queue depths are read from Redis or the SQLite broker only")


def _redis_depths(url: str, shown: str) -> QueueDepths:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    waiting = {}
    for name in QUEUES:
        keys = [name, *client.scan_iter(match=f"{name}{_REDIS_PRIORITY_SEP}*", count=100)]
        waiting[name] = sum(int(client.llen(key)) for key in keys)
    return QueueDepths(shown, waiting, unacked=int(client.hlen("unacked")))


def _sqlite_depths(path: str, shown: str) -> QueueDepths:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2) as connection:
        rows = connection.execute(
            "SELECT q.name, COUNT(*) FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id"
            " WHERE m.visible = 1 GROUP BY q.name"
        ).fetchall()
    counts = {str(name): int(count) for name, count in rows}
    return QueueDepths(shown, {name: counts.get(name, 0) for name in QUEUES})


def live_workers(settings: Settings, timeout: float) -> Workers:
    """Workers answering ``celery inspect ping`` within ``timeout`` s (Redis broker; broadcast needs it)."""
    if not settings.celery_broker_url.startswith(("redis://", "rediss://")):
        return Workers(error="the SQLite broker has no broadcast; ping needs Redis (see docs/deployment.md)")
    from node.celery_app import make_celery

    app = make_celery(settings)
    try:
        app.conf.broker_connection_retry = False
        app.conf.broker_connection_max_retries = 0
        answers = app.control.inspect(timeout=timeout).ping() or {}
    except Exception as error:  # noqa: BLE001 - kombu/redis connection errors of many types: report them
        return Workers(error=f"{type(error).__name__}: {error}")
    finally:
        app.close()
    return Workers(sorted(answers))


def job_figures(settings: Settings, window: timedelta) -> JobFigures:
    """Jobs by state over the window, and the oldest unfinished job, from the audit DB."""
    from sqlalchemy import func, select
    from sqlalchemy.exc import SQLAlchemyError

    from node.audit.db import AuditDB
    from node.audit.models import Job, JobState

    minutes = int(window.total_seconds() // 60)
    audit = AuditDB(settings.audit_url)
    now = datetime.now(UTC)
    try:
        with audit.session() as session:
            rows = session.execute(
                select(Job.state, func.count()).where(Job.updated_at >= now - window).group_by(Job.state)
            ).all()
            oldest = session.scalars(
                select(Job).where(Job.state.in_([JobState(s) for s in UNFINISHED])).order_by(Job.created_at).limit(1)
            ).first()
            oldest_row = None if oldest is None else {
                "id": oldest.id, "state": oldest.state.value, "attempts": oldest.attempts,
                "created_at": _utc(oldest.created_at).isoformat(),
                "age_seconds": (now - _utc(oldest.created_at)).total_seconds(), "worker": oldest.worker,
            }  # fmt: skip
    except SQLAlchemyError as error:
        return JobFigures(minutes, error=f"audit DB: {type(error).__name__}: {error}".splitlines()[0])
    finally:
        audit.dispose()
    return JobFigures(minutes, {JobState(state).value: int(count) for state, count in rows}, oldest_row)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def collect_status(settings: Settings, window: timedelta, ping_timeout: float) -> StatusReport:
    return StatusReport(
        queues=queue_depths(settings.celery_broker_url),
        workers=live_workers(settings, ping_timeout),
        jobs=job_figures(settings, window),
    )


# -- the command -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gvr status",
        description="Queue depths, live workers, jobs by state over a recent window and the oldest "
        "unfinished job, read from the broker and the audit DB in the settings.",
        formatter_class=HelpFormatter,
    )
    add_config_option(parser)
    parser.add_argument("--window-minutes", type=int, default=60, help="jobs updated within this many minutes")
    parser.add_argument("--ping-timeout", type=float, default=1.0, help="seconds to wait for workers to answer")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.window_minutes < 1 or args.ping_timeout <= 0:
        print("gvr status: --window-minutes must be >= 1 and --ping-timeout > 0", file=sys.stderr)
        return 2
    try:
        settings = settings_from(args)
    except (ValidationError, FileNotFoundError) as error:
        log.error("invalid settings: %s", error)
        return 2
    report = collect_status(settings, timedelta(minutes=args.window_minutes), args.ping_timeout)
    print(json.dumps(report.as_json(), indent=2) if args.json else report.render())
    return 0
