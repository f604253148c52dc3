"""``gvr status``: is the node healthy and keeping up? A health check with the numbers behind it.

Exit status (documented in docs/deployment.md; compose and systemd use it):

* 0: every part checked is up;
* 1: a part checked is down: the broker, the audit DB, the node (its heartbeat
  file: a service thread died, or it stopped), or every worker of a queue;
  the ``Health`` line (``health.problems`` in JSON) names each;
* 2: a usage or settings mistake.

``--check`` picks the parts that count (compose gives each service its own).
Workers are seen only on Redis: on the SQLite broker they are "not checked",
said so, and never counted as down.

One snapshot: job states are read in one database transaction (REPEATABLE READ
on PostgreSQL, one read transaction on SQLite), the queue depths right after
(one Redis MULTI), then the heartbeat and the slower worker broadcast. A part
that cannot be reached says why; the command never fails whole.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from node.broker_stats import QUEUES, QueueDepths, Workers, live_workers, queue_depths, redacted
from node.cli.common import HelpFormatter, add_config_option, settings_from, setup_logging
from node.config import Settings
from node.heartbeat import NodeHealth, heartbeat_path, read_heartbeat

log = logging.getLogger("gvr.status")

__all__ = ["build_parser", "collect_status", "main", "redacted"]
UNFINISHED = ("QUEUED", "RUNNING", "INFERRED")
PARTS = ("broker", "db", "node", *QUEUES)
EXIT_HEALTHY, EXIT_DOWN, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True)
class JobFigures:
    """Jobs updated within the window by state, every unfinished job by state, and the oldest unfinished."""

    window_minutes: int
    by_state: dict[str, int] = field(default_factory=dict)
    open_by_state: dict[str, int] = field(default_factory=dict)
    oldest_unfinished: dict[str, Any] | None = None
    error: str | None = None


@dataclass(frozen=True)
class StatusReport:
    queues: QueueDepths
    workers: Workers
    jobs: JobFigures
    node: NodeHealth
    checked: tuple[str, ...] = PARTS

    def problems(self) -> list[str]:
        """What is down among the checked parts, one line each."""
        found = []
        if "broker" in self.checked and self.queues.error:
            found.append(f"broker: {self.queues.error}")
        if "db" in self.checked and self.jobs.error:
            found.append(self.jobs.error)
        if "node" in self.checked and self.node.problem:
            found.append(f"node: {self.node.problem}")
        for queue in (q for q in QUEUES if q in self.checked and self.workers.checked):
            if self.workers.error:
                found.append(f"workers of queue {queue}: cannot ask ({self.workers.error})")
            elif not self.workers.by_queue.get(queue):
                found.append(f"workers of queue {queue}: none alive")
        return found

    def unchecked(self) -> list[str]:
        return [f"workers of queue {q}: {self.workers.error}" for q in QUEUES
                if q in self.checked and not self.workers.checked]  # fmt: skip

    def as_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["checked"] = list(self.checked)
        body["health"] = {"ok": not self.problems(), "problems": self.problems(), "unchecked": self.unchecked()}
        return body

    def render(self) -> str:
        problems = self.problems()
        lines = ["Health: OK" if not problems else "Health: DOWN"]
        lines += [f"  {problem}" for problem in problems]
        lines += [f"  not checked: {item}" for item in self.unchecked()]
        lines += self._render_queues() + self._render_workers() + self._render_node() + self._render_jobs()
        return "\n".join(lines)

    def _render_queues(self) -> list[str]:
        lines = [f"Broker {self.queues.broker}"]
        if self.queues.error:
            return [*lines, f"  queues: unavailable ({self.queues.error})"]
        lines += [f"  queue {name:<6} {self.queues.waiting.get(name, 0):>6} waiting" for name in QUEUES]
        if self.queues.unacked is not None:
            lines.append(f"  taken by workers, not yet acknowledged: {self.queues.unacked}")
        return lines

    def _render_workers(self) -> list[str]:
        if self.workers.error:
            return [f"Workers: {'unknown' if not self.workers.checked else 'unavailable'} ({self.workers.error})"]
        lines = [f"Workers alive: {len(self.workers.names)}"]
        for queue, names in sorted(self.workers.by_queue.items()):
            lines.append(f"  queue {queue:<6} {len(names)}: {', '.join(names) or '-'}")
        return lines

    def _render_node(self) -> list[str]:
        node = self.node
        if node.threads is None:
            return [f"Node: {node.problem}"]
        threads = ", ".join(f"{name} {'alive' if alive else 'DEAD'}" for name, alive in node.threads.items())
        return [f"Node: heartbeat {node.age_seconds:.0f} s ago; {threads}" + (f" ({node.problem})" if node.problem
                                                                                else "")]  # fmt: skip

    def _render_jobs(self) -> list[str]:
        jobs = self.jobs
        if jobs.error:
            return [f"Jobs: unavailable ({jobs.error})"]
        counts = ", ".join(f"{state} {count}" for state, count in sorted(jobs.by_state.items())) or "none"
        unfinished = ", ".join(f"{state} {count}" for state, count in sorted(jobs.open_by_state.items())) or "none"
        lines = [f"Jobs updated in the last {jobs.window_minutes} min: {counts}", f"Jobs unfinished: {unfinished}"]
        oldest = jobs.oldest_unfinished
        if oldest is None:
            return [*lines, "Oldest unfinished job: none"]
        return [*lines, (f"Oldest unfinished job: {oldest['id']} {oldest['state']}, created "
                        f"{oldest['age_seconds']:.0f} s ago, {oldest['attempts']} attempt(s)")]  # fmt: skip


# -- gathering -------------------------------------------------------------------------


def job_figures(settings: Settings, window: timedelta) -> JobFigures:
    """Jobs by state over the window, every unfinished job by state, and the oldest one: one snapshot."""
    from sqlalchemy import func, select, text
    from sqlalchemy.exc import SQLAlchemyError

    from node.audit.db import AuditDB
    from node.audit.models import Job, JobState

    minutes = int(window.total_seconds() // 60)
    sqlite_file = Path(settings.audit_url.removeprefix("sqlite:///"))
    if settings.audit_url.startswith("sqlite:///") and not sqlite_file.is_file():  # looking must not create it
        return JobFigures(minutes, error=f"audit DB: {sqlite_file} does not exist (is GVR_DATA_DIR right? "
                                         "`gvr node` or `gvr db upgrade` creates it)")  # fmt: skip
    audit = AuditDB(settings.audit_url)
    now = datetime.now(UTC)
    unfinished = [JobState(s) for s in UNFINISHED]
    try:
        with audit.session() as session:
            if audit.engine.dialect.name == "postgresql":  # every statement below sees one snapshot
                session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
            elif audit.engine.dialect.name == "sqlite":  # pysqlite begins no transaction for a SELECT
                session.execute(text("BEGIN"))
            rows = session.execute(
                select(Job.state, func.count()).where(Job.updated_at >= now - window).group_by(Job.state)
            ).all()
            open_rows = session.execute(
                select(Job.state, func.count()).where(Job.state.in_(unfinished)).group_by(Job.state)
            ).all()
            oldest = session.scalars(
                select(Job).where(Job.state.in_(unfinished)).order_by(Job.created_at).limit(1)
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
    return JobFigures(
        minutes,
        {JobState(state).value: int(count) for state, count in rows},
        {JobState(state).value: int(count) for state, count in open_rows},
        oldest_row,
    )


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def collect_status(
    settings: Settings, window: timedelta, ping_timeout: float, checked: tuple[str, ...] = PARTS
) -> StatusReport:
    """Job states and queue depths first, back to back; then the heartbeat and the worker broadcast."""
    jobs = job_figures(settings, window)
    queues = queue_depths(settings.celery_broker_url)
    node = read_heartbeat(heartbeat_path(settings.resolved_data_dir))
    if any(queue in checked for queue in QUEUES):
        workers = live_workers(settings, ping_timeout)
    else:  # a health check of the node alone need not wait for the broadcast
        workers = Workers(checked=False, error="not asked: --check names no queue")
    return StatusReport(queues, workers, jobs, node, checked)


# -- the command -----------------------------------------------------------------------


def _parts(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if not parts or unknown:
        raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(unknown) or '(none)'}: "
                                         f"choose from {','.join(PARTS)}")  # fmt: skip
    return parts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gvr status",
        description="Health check and numbers: broker, audit DB, node threads, live workers per queue, queue "
        "depths, jobs by state. Exit status 0: every checked part is up; 1: a part is down (named); "
        "2: a usage or settings mistake.",
        formatter_class=HelpFormatter,
    )
    add_config_option(parser)
    parser.add_argument("--check", type=_parts, default=PARTS, metavar="PARTS",
                        help=f"comma-separated parts whose failure makes the exit status 1 "
                        f"(default: all of {','.join(PARTS)})")  # fmt: skip
    parser.add_argument("--window-minutes", type=int, default=60, help="jobs updated within this many minutes")
    parser.add_argument("--ping-timeout", type=float, default=1.0, help="seconds to wait for workers to answer")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.window_minutes < 1 or args.ping_timeout <= 0:
        print("gvr status: --window-minutes must be >= 1 and --ping-timeout > 0", file=sys.stderr)
        return EXIT_USAGE
    settings = settings_from(args)
    report = collect_status(settings, timedelta(minutes=args.window_minutes), args.ping_timeout, args.check)
    print(json.dumps(report.as_json(), indent=2) if args.json else report.render())
    return EXIT_HEALTHY if not report.problems() else EXIT_DOWN
