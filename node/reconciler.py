"""The reconciler: the node reads the audit DB and re-publishes every job that is overdue.

Messages on the broker can be lost (a worker that took them and died, Redis
killed before its append-only file caught up, a worker that could not reach the
DB and acknowledged anyway); the audit DB cannot. Every few seconds
(``reconcile_seconds``) the node's reconciler looks at the jobs that wait for
something and acts on each deadline, with an audit event each time:

- a retry whose due time (``next_attempt_at``) has come: published;
- QUEUED, or INFERRED awaiting delivery, published but not taken by any worker
  within ``job_publish_deadline_seconds`` (doubling with each re-publish, so a
  long legitimate backlog costs a few duplicate messages, not many): published
  again;
- RUNNING, or INFERRED being delivered, whose lease expired (its worker stopped
  sending heartbeats: killed, out of memory, host gone): published again, or
  FAILED once its workers died ``MAX_WORKER_DEATHS`` times.

Publishing twice is harmless: a worker claims a job with one conditional UPDATE
(``node.job_lease``), so a duplicate message finds the job taken and is dropped.
Recovery therefore does not wait for Redis's visibility timeout (an hour).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select

from node.audit.db import AuditDB, add_event
from node.audit.models import Job, JobState, as_utc, utcnow
from node.config import Settings
from node.job_lease import MAX_DELIVERY_DEATHS, MAX_WORKER_DEATHS, deaths, end_failed, exhausted_reason
from node.supervision import SupervisedLoop

log = logging.getLogger(__name__)

Publish = Callable[[str], None]
MAX_BACKOFF_DOUBLINGS = 5  # the publish deadline grows to at most 32 times its setting
ROWS_PER_PASS = 500  # a pass stays short even with a huge backlog; the next pass takes the rest


@dataclass
class ReconcileReport:
    published: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.published or self.failed)


class BrokerUnavailableError(RuntimeError):
    """Publishing failed: the rest of this pass waits for the next one."""


class Reconciler:
    """Acts on overdue jobs; ``run_once`` is one pass, ``start`` runs it in a supervised thread."""

    def __init__(
        self, settings: Settings, audit: AuditDB, publish_analysis: Publish, publish_delivery: Publish, actor: str
    ) -> None:
        self.settings = settings
        self.audit = audit
        self.publish_analysis = publish_analysis
        self.publish_delivery = publish_delivery
        self.actor = actor
        self.loop = SupervisedLoop("reconciler", self.run_once, settings.reconcile_seconds)

    def run_once(self) -> ReconcileReport:
        report = ReconcileReport()
        now = utcnow()
        try:
            for job_id in self._candidates(now):
                self._reconcile(job_id, now, report)
        except BrokerUnavailableError as error:
            log.warning("reconciler: %s; the next pass tries again", error)
        if report:
            log.info("reconciler: %d job(s) published again, %d failed", len(report.published), len(report.failed))
        return report

    def _candidates(self, now: datetime) -> list[str]:
        """Jobs that may be overdue (cheap filter; ``_reconcile`` decides per job in its own transaction)."""
        first_deadline = now - timedelta(seconds=self.settings.job_publish_deadline_seconds)
        waiting = or_(
            Job.next_attempt_at <= now,
            Job.lease_expires_at < now,
            and_(Job.state == JobState.RUNNING, Job.lease_expires_at.is_(None)),
            and_(Job.lease_expires_at.is_(None), Job.next_attempt_at.is_(None), Job.enqueued_at <= first_deadline),
            and_(Job.state == JobState.INFERRED, Job.enqueued_at.is_(None), Job.lease_expires_at.is_(None)),
        )
        with self.audit.session() as session:
            return list(session.scalars(
                select(Job.id).where(Job.state.in_((JobState.QUEUED, JobState.RUNNING, JobState.INFERRED)), waiting)
                .order_by(Job.created_at).limit(ROWS_PER_PASS)
            ))  # fmt: skip

    def _reconcile(self, job_id: str, now: datetime, report: ReconcileReport) -> None:
        with self.audit.session() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                return
            action = self._overdue(job, now)
            if action is None:
                return
            kind, reason = action
            if kind == "fail":
                end_failed(session, job, self.actor, reason)
                report.failed.append(job.id)
                return
            delivery = job.state is JobState.INFERRED
            try:
                (self.publish_delivery if delivery else self.publish_analysis)(job.id)
            except Exception as error:
                raise BrokerUnavailableError(f"cannot publish job {job.id}: {type(error).__name__}") from error
            if job.state is JobState.RUNNING:
                job.state = JobState.QUEUED
            job.enqueued_at, job.next_attempt_at, job.lease_expires_at = now, None, None
            job.republished += 1
            queue = "dicom" if delivery else "gpu"
            add_event(session, "job.republished", ("job", job.id), self.actor, f"{reason}: sent to queue {queue}",
                      {"republished": job.republished, "queue": queue})  # fmt: skip
            report.published.append(job.id)

    def _overdue(self, job: Job, now: datetime) -> tuple[str, str] | None:
        """("publish" | "fail", why) for an overdue job, None when it is fine after all."""
        lease = _aware(job.lease_expires_at)
        if job.state is JobState.RUNNING and lease is None and job.started_at is not None:
            lease = as_utc(job.started_at) + timedelta(seconds=self.settings.job_lease_seconds)
        if lease is not None and lease < now:
            holder = job.worker or "its worker"
            if job.state is JobState.RUNNING and deaths(job) >= MAX_WORKER_DEATHS:
                return "fail", exhausted_reason(job)
            if job.state is JobState.INFERRED and job.republished >= MAX_DELIVERY_DEATHS:
                return "fail", (f"delivery failed: gave up after its delivery worker stopped {job.republished + 1} "
                                f"times (killed); try again with: gvr resend {job.id}")  # fmt: skip
            return "publish", f"{holder} stopped renewing its lease (no heartbeat since {lease:%H:%M:%S} UTC)"
        if lease is not None:
            return None  # a worker holds it
        due = _aware(job.next_attempt_at)
        if due is not None:
            return ("publish", f"retry {job.retries} is due") if due <= now else None
        published = _aware(job.enqueued_at)
        if published is None:
            # QUEUED and never published is the assembler's; INFERRED: the worker could not publish
            return ("publish", "inferred, delivery not yet published") if job.state is JobState.INFERRED else None
        deadline = self.settings.job_publish_deadline_seconds * 2 ** min(job.republished, MAX_BACKOFF_DOUBLINGS)
        if published + timedelta(seconds=deadline) <= now:
            return "publish", f"{job.state.value} for {(now - published).total_seconds():.0f} s with no worker taking it"
        return None

    # -- the background loop --------------------------------------------------------

    def start(self, on_death: Callable[[str, BaseException], None] | None = None) -> None:
        self.loop.on_death = on_death
        self.loop.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.loop.stop(timeout)


def _aware(moment: datetime | None) -> datetime | None:
    return None if moment is None else as_utc(moment)
