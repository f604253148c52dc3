"""Claims, leases and scheduled retries: how workers and the node's reconciler share a job.

The audit DB is the one truth about every job (issue 10). A worker *claims* a
job with one conditional UPDATE, so of two copies of a message only one runs
it; the claim gives it a lease (``lease_expires_at``) that a heartbeat thread
renews while it works. A worker that dies stops renewing: the node's reconciler
sees the expired lease and publishes the job again. A retry is a due time in the
DB (``next_attempt_at``), never a countdown message held in a worker's memory.

Phases: analysis (QUEUED -> RUNNING -> INFERRED) and delivery (INFERRED -> SENT);
``retries`` and ``republished`` restart with each phase. Deaths of analysis
workers are ``attempts - retries``: starts that ended neither in a result nor
in a scheduled retry. Broker brokers and databases fail in many ways; callers
treat ``TRANSIENT_DB_ERRORS`` as "the DB is away, try later".
"""

from __future__ import annotations

import enum
import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Self, cast

from sqlalchemy import ColumnElement, CursorResult, Update, and_, or_, true, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from node.audit.db import AuditDB, add_event
from node.audit.models import Job, JobState, as_utc, utcnow

log = logging.getLogger(__name__)

TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (OperationalError,)
# Redelivery cap: a job whose workers died this many times (out of memory, killed) is FAILED,
# so a job that kills every worker cannot loop for ever.
MAX_WORKER_DEATHS = 3
MAX_DELIVERY_DEATHS = 5


class ClaimOutcome(enum.StrEnum):
    CLAIMED = "claimed"
    MISSING = "missing"  # no such job
    TAKEN = "taken"  # another worker holds a live lease (a duplicate message)
    NOT_DUE = "not due"  # a retry is scheduled for later; the reconciler publishes it then
    DONE = "done"  # past this phase (INFERRED/SENT, or FAILED)
    WRONG_PHASE = "wrong phase"  # e.g. a delivery message for a job still being analysed
    EXHAUSTED = "exhausted"  # its workers died MAX_WORKER_DEATHS times: now FAILED


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    state_before: str = ""
    attempts: int = 0

    @property
    def claimed(self) -> bool:
        return self.outcome is ClaimOutcome.CLAIMED


def deaths(job: Job) -> int:
    """Analysis starts that ended without a result or a scheduled retry: a worker died."""
    return max(0, job.attempts - job.retries)


def _lease_free(now: datetime) -> ColumnElement[bool]:
    return or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now)


def _due(now: datetime) -> ColumnElement[bool]:
    return or_(Job.next_attempt_at.is_(None), Job.next_attempt_at <= now)


def _rows_changed(session: Session, statement: Update) -> int:
    """Run a conditional UPDATE; how many rows it changed (1: this caller won)."""
    result = session.execute(statement.execution_options(synchronize_session=False))
    return int(cast(CursorResult[object], result).rowcount)


def claim_analysis(session: Session, job_id: str, actor: str, device: str, lease_s: float) -> Claim:
    """Take job ``job_id`` for inference if it is QUEUED and due, or RUNNING with an expired lease."""
    now = utcnow()
    job = session.get(Job, job_id)
    if job is None:
        return Claim(ClaimOutcome.MISSING)
    before = job.state.value
    if job.state in (JobState.INFERRED, JobState.SENT, JobState.FAILED):
        return Claim(ClaimOutcome.DONE, before, job.attempts)
    lease = None if job.lease_expires_at is None else as_utc(job.lease_expires_at)
    if job.state is JobState.RUNNING and (lease is None or lease < now) and deaths(job) >= MAX_WORKER_DEATHS:
        fail_exhausted(session, job, actor)
        return Claim(ClaimOutcome.EXHAUSTED, before, job.attempts)
    free_and_due = or_(
        and_(Job.state == JobState.QUEUED, _due(now)),
        and_(Job.state == JobState.RUNNING, _lease_free(now)),
    )
    taken = _rows_changed(session, update(Job).where(Job.id == job_id, free_and_due).values(
        state=JobState.RUNNING, attempts=Job.attempts + 1, worker=actor, device=device,
        started_at=now, finished_at=None, error=None, next_attempt_at=None,
        lease_expires_at=now + timedelta(seconds=lease_s), updated_at=now,
    ))  # fmt: skip
    if taken != 1:
        session.refresh(job)
        waiting = job.state is JobState.QUEUED
        return Claim(ClaimOutcome.NOT_DUE if waiting else ClaimOutcome.TAKEN, before, job.attempts)
    session.refresh(job)
    add_event(session, "job.running", ("job", job_id), actor, f"inference attempt {job.attempts} on {device}",
              {"previous_state": before, "lease_s": lease_s})  # fmt: skip
    return Claim(ClaimOutcome.CLAIMED, before, job.attempts)


def claim_delivery(session: Session, job_id: str, actor: str, lease_s: float, force: bool = False) -> Claim:
    """Take job ``job_id`` for delivery if it is INFERRED, due and not held (``force``: FAILED or SENT too)."""
    now = utcnow()
    job = session.get(Job, job_id)
    if job is None:
        return Claim(ClaimOutcome.MISSING)
    before = job.state.value
    deliverable = (JobState.INFERRED, JobState.FAILED, JobState.SENT) if force else (JobState.INFERRED,)
    if job.state not in deliverable:
        done = job.state in (JobState.SENT, JobState.FAILED)
        return Claim(ClaimOutcome.DONE if done else ClaimOutcome.WRONG_PHASE, before, job.attempts)
    condition = and_(Job.state.in_(deliverable), _lease_free(now), true() if force else _due(now))
    taken = _rows_changed(session, update(Job).where(Job.id == job_id, condition).values(
        state=JobState.INFERRED, worker=actor, next_attempt_at=None, updated_at=now,
        lease_expires_at=now + timedelta(seconds=lease_s),
    ))  # fmt: skip
    if taken != 1:
        session.refresh(job)
        due_later = job.next_attempt_at is not None and as_utc(job.next_attempt_at) > now
        return Claim(ClaimOutcome.NOT_DUE if due_later else ClaimOutcome.TAKEN, before, job.attempts)
    session.refresh(job)
    if job.state is not JobState.INFERRED or before != JobState.INFERRED.value:
        add_event(session, "job.redelivery", ("job", job_id), actor, f"delivery of a {before} job started again",
                  {"previous_state": before})  # fmt: skip
    return Claim(ClaimOutcome.CLAIMED, before, job.attempts)


def exhausted_reason(job: Job) -> str:
    return (f"gave up after {job.attempts} attempts: each worker running this job died (out of memory, "
            f"killed); gvr audit shows the attempts. Run it again with: gvr rerun {job.id}")


def end_failed(session: Session, job: Job, actor: str, reason: str) -> None:
    """End the job FAILED with ``reason`` (a sentence a person can act on), held by nobody, with its event."""
    previous = job.state.value
    job.state, job.error, job.finished_at = JobState.FAILED, reason[:4000], utcnow()
    release(job)
    add_event(session, "job.failed", ("job", job.id), actor, reason, {"previous_state": previous})


def fail_exhausted(session: Session, job: Job, actor: str) -> None:
    """The redelivery cap: a job that killed MAX_WORKER_DEATHS workers ends FAILED instead of looping."""
    end_failed(session, job, actor, exhausted_reason(job))


def schedule_retry(session: Session, job: Job, actor: str, reason: str, delay_s: float, kind: str) -> datetime:
    """Put the job's current phase back with a due time: QUEUED for analysis, INFERRED for delivery."""
    due = utcnow() + timedelta(seconds=delay_s)
    if job.state is JobState.RUNNING:
        job.state = JobState.QUEUED
    job.retries += 1
    job.next_attempt_at, job.lease_expires_at, job.enqueued_at = due, None, None
    add_event(session, kind, ("job", job.id), actor, f"retry {job.retries} due in {delay_s:.0f} s: {reason}",
              {"delay_s": delay_s, "retry": job.retries, "due": due.isoformat()})  # fmt: skip
    return due


def release(job: Job) -> None:
    """The phase ended (result written, SENT, FAILED): nobody holds the job, nothing is due."""
    job.lease_expires_at = job.next_attempt_at = None


def start_phase(job: Job, state: JobState) -> None:
    """Enter a new phase: its retry and re-publish counts start from zero."""
    job.state = state
    job.retries = job.republished = 0
    job.enqueued_at = None
    release(job)


class Heartbeat:
    """Renews a job's lease every third of its length while the worker works on it.

    Used as a context manager around the work. ``lost`` turns true when a renewal
    found the job no longer held by this worker (its lease had expired and the
    reconciler gave the job to another); the DB being away only skips a beat.
    """

    def __init__(self, audit: AuditDB, job_id: str, actor: str, lease_s: float) -> None:
        self.audit = audit
        self.job_id = job_id
        self.actor = actor
        self.lease_s = lease_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id[:8]}", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def beat(self) -> bool:
        """Renew once; False when the job is no longer this worker's."""
        now = utcnow()
        with self.audit.session() as session:
            renewed = _rows_changed(session, update(Job).where(
                Job.id == self.job_id, Job.worker == self.actor, Job.lease_expires_at.is_not(None),
                Job.state.in_((JobState.RUNNING, JobState.INFERRED)),
            ).values(lease_expires_at=now + timedelta(seconds=self.lease_s)))  # fmt: skip
        return renewed == 1

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                if not self.beat():
                    self.lost = True
                    log.warning("job %s: lease lost (the job was given to another worker)", self.job_id)
                    return
            except Exception as error:  # noqa: BLE001 - the DB away: skip this beat, try the next
                log.warning("job %s: heartbeat failed (%s)", self.job_id, type(error).__name__)
