"""The ``dicom`` queue's task: build a job's result objects and C-STORE them to each destination.

``node.deliver_results(job_id)`` re-reads the job, builds the objects into the
spool outbox unless a complete outbox is there already, and sends them over
one association per destination (``Settings.destinations`` by default),
checking every C-STORE status. Each object sent to each destination is one
``Delivery`` row per attempt; the job becomes SENT (with an event) once every
destination holds every object.

Idempotent by construction: UIDs are deterministic, so a retry or a
``gvr resend`` sends the same SOP instances (a PACS keeps one copy), and a
destination that already acknowledged every object is skipped. A destination
that is down (association refused, dropped, 0xA7xx out of resources) is
retried with exponential backoff up to a cap; any other refusal, or the last
retry, marks the job FAILED with the reason and the ``gvr resend`` command.
An answer the audit DB cannot record (the DB away) stops the association; it is
recorded as soon as the DB is back, so an acknowledged object is never sent again.

Settings come from ``node.config.load_settings()`` (``GVR_*``) once per
worker process; the retry policy from the app's ``gvr_delivery`` conf key.
Never imports torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from celery import Task, shared_task
from celery.exceptions import Reject
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from node.audit.db import AuditDB, actor_name, add_event
from node.audit.models import Delivery, DeliveryStatus, Job, JobState, utcnow
from node.celery_app import TASK_DELIVER, job_id_argument
from node.config import Peer, Settings, load_settings
from node.job_lease import ClaimOutcome, Heartbeat, claim_delivery, release, schedule_retry
from node.results.build import OutboxEntry, ResultBuildError, outbox_path, prepare_outbox
from node.results.source_header import SourceRepair
from node.scu import FileToSend, PeerUnreachableError, SendResult, send_files
from node.spool import Spool, process_owner
from node.supervision import withheld

log = logging.getLogger(__name__)
DELIVERY_CONF_KEY = "gvr_delivery"  # app.conf key: RetryPolicy fields, e.g. {"max_retries": 3}
_OUT_OF_RESOURCES = 0xA700
REJECT_PAUSE_S = 2.0  # the audit DB is away: wait this long before giving a message back
# How long a delivery waits for the audit DB to record an object a PACS has just acknowledged; an
# acknowledgement that cannot be recorded is sent again later (a PACS keeping every copy stores it twice).
ACK_RECORD_PATIENCE_S = 120.0


class DeliveryError(RuntimeError):
    """Delivery cannot succeed by retrying (refused objects, no destinations, no results)."""


class DeliveryRefusedError(DeliveryError):
    """This job cannot be delivered now (no such job, not inferred, held by a worker); it is left as it is."""


class DestinationUnavailableError(DeliveryError):
    """At least one destination was down or busy: retrying later may succeed."""


class _AuditAwayError(Exception):
    """The audit DB could not record a PACS's answer: stop sending (nothing more could be recorded)."""

    def __init__(self, row: tuple[OutboxEntry, int | None, str | None]) -> None:
        super().__init__("the audit DB is unreachable")
        self.row = row


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff while a destination is down: first_delay * 2**n seconds, at most max_delay."""

    max_retries: int = 8
    first_delay: float = 2.0
    max_delay: float = 300.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries {self.max_retries} must be >= 0")
        if not 0 < self.first_delay <= self.max_delay:
            raise ValueError(f"need 0 < first_delay ({self.first_delay}) <= max_delay ({self.max_delay})")

    def delay(self, retries_so_far: int) -> float:
        return float(min(self.max_delay, self.first_delay * 2**retries_so_far))

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any]) -> RetryPolicy:
        options = dict(conf.get(DELIVERY_CONF_KEY) or {})
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise ValueError(
                f"unknown {DELIVERY_CONF_KEY} option(s) {sorted(unknown)}; expected {sorted(known)}"
            )
        return cls(**options)


@dataclass(frozen=True)
class DeliveryContext:
    """What one process needs to deliver: settings, the audit DB, the spool, who it is."""

    settings: Settings
    audit: AuditDB
    spool: Spool
    actor: str

    @classmethod
    def load(cls, settings: Settings, role: str = "delivery") -> DeliveryContext:
        spool = Spool(settings.spool_dir, owner=process_owner(role))
        spool.clear_partial_writes()  # this host's dead processes' leftovers; never a live one's
        return cls(settings, AuditDB(settings.audit_url), spool, actor_name(role))


@dataclass(frozen=True)
class DestinationOutcome:
    destination: str
    sent: int
    failed: int
    transient: bool = False  # the failure may pass (destination down or out of resources)
    skipped: bool = False  # already held every object from an earlier attempt
    error: str | None = None


@dataclass(frozen=True)
class DeliveryReport:
    job_id: str
    attempt: int
    objects: tuple[OutboxEntry, ...]
    outcomes: tuple[DestinationOutcome, ...] = field(default_factory=tuple)

    @property
    def complete(self) -> bool:
        return all(outcome.failed == 0 and outcome.error is None for outcome in self.outcomes)


def _job(ctx: DeliveryContext, job_id: str) -> Job:
    with ctx.audit.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise DeliveryRefusedError(f"there is no job {job_id} in the audit database (gvr audit lists the jobs)")
        return job


def _next_attempt(ctx: DeliveryContext, job_id: str) -> int:
    with ctx.audit.session() as session:
        last = session.scalar(select(func.max(Delivery.attempt)).where(Delivery.job_id == job_id))
    return int(last or 0) + 1


def _acknowledged(ctx: DeliveryContext, job_id: str, destination: str) -> set[str]:
    """SOP instances of this job that ``destination`` has acknowledged (in any attempt)."""
    with ctx.audit.session() as session:
        return set(
            session.scalars(
                select(Delivery.sop_instance_uid).where(
                    Delivery.job_id == job_id,
                    Delivery.destination == destination,
                    Delivery.status == DeliveryStatus.SENT,
                )
            )
        )


def _send_to(
    ctx: DeliveryContext, job_id: str, peer: Peer, entries: Sequence[OutboxEntry], attempt: int
) -> DestinationOutcome:
    """One association to ``peer`` carrying every object it has not acknowledged yet.

    Each answer is recorded (one Delivery row) as it arrives, so a delivery killed
    mid-association re-sends only what the PACS did not acknowledge.
    """
    held = _acknowledged(ctx, job_id, str(peer))
    pending = [e for e in entries if e.sop_instance_uid not in held]
    if not pending:
        return DestinationOutcome(str(peer), 0, 0, skipped=True)
    by_uid = {e.sop_instance_uid: e for e in pending}
    answered: dict[str, tuple[int | None, str | None]] = {}

    def record(item: FileToSend, result: SendResult) -> None:
        entry = by_uid[item.sop_instance_uid]
        error: str | None = None
        if not result.ok:
            status = "no status" if result.status is None else f"status 0x{result.status:04X}"
            error = result.error or f"C-STORE of {entry.kind} {entry.sop_instance_uid} refused with {status}"
        answered[entry.sop_instance_uid] = (result.status, error)
        try:
            _record(ctx, job_id, str(peer), attempt, [(entry, result.status, error)])
        except OperationalError as exc:
            raise _AuditAwayError((entry, result.status, error)) from exc

    files = [FileToSend(outbox_path(ctx.spool, job_id, e), e.sop_class_uid, e.sop_instance_uid,
                        e.transfer_syntax) for e in pending]  # fmt: skip
    settings = ctx.settings
    lost: str | None = None
    try:
        send_files(files, peer, settings.ae_title, timeout=settings.dimse_timeout, on_result=record)
    except _AuditAwayError as away:
        _record_patiently(ctx, job_id, str(peer), attempt, away.row)  # raises OperationalError if it never can
        lost = "sending stopped while the audit DB was unreachable"
        log.warning("job %s: %s; %d of %d object(s) answered and recorded", job_id, lost, len(answered),
                    len(pending))  # fmt: skip
        unanswered = [e for e in pending if e.sop_instance_uid not in answered]
        _record(ctx, job_id, str(peer), attempt, [(e, None, lost) for e in unanswered])
    except (PeerUnreachableError, OSError) as exc:
        lost = f"{type(exc).__name__}: {exc}"
        unanswered = [e for e in pending if e.sop_instance_uid not in answered]
        _record(ctx, job_id, str(peer), attempt, [(e, None, lost) for e in unanswered])
        log.warning("job %s: destination %s unavailable (attempt %d, %d of %d object(s) unanswered): %s",
                    job_id, peer, attempt, len(unanswered), len(pending), lost)  # fmt: skip
    failed = [(status, error) for status, error in answered.values() if error]
    transient = lost is not None or any(status is None or status & 0xFF00 == _OUT_OF_RESOURCES
                                        for status, _ in failed)  # fmt: skip
    sent = len(answered) - len(failed)
    first_error = next((error for _, error in failed), None) or lost
    return DestinationOutcome(str(peer), sent, len(pending) - sent, transient=transient, error=first_error)


def _record_patiently(
    ctx: DeliveryContext, job_id: str, destination: str, attempt: int,
    row: tuple[OutboxEntry, int | None, str | None],
) -> None:  # fmt: skip
    """Record one answer once the audit DB is back (up to ``ACK_RECORD_PATIENCE_S``): an acknowledgement
    that is not recorded would be sent again, and a PACS that keeps every copy would store it twice."""
    deadline = time.monotonic() + ACK_RECORD_PATIENCE_S
    while True:
        try:
            _record(ctx, job_id, destination, attempt, [row])
            return
        except OperationalError:
            if time.monotonic() >= deadline:
                log.error("job %s: %s's answer for %s could not be recorded: it will be sent again", job_id,
                          destination, row[0].sop_instance_uid)  # fmt: skip
                raise
            time.sleep(1.0)


def _record(
    ctx: DeliveryContext, job_id: str, destination: str, attempt: int,
    rows: Sequence[tuple[OutboxEntry, int | None, str | None]],
) -> None:  # fmt: skip
    with ctx.audit.session() as session:
        for entry, status, error in rows:
            session.add(
                Delivery(
                    job_id=job_id, destination=destination, sop_instance_uid=entry.sop_instance_uid,
                    sop_class_uid=entry.sop_class_uid, attempt=attempt,
                    status=DeliveryStatus.FAILED if error else DeliveryStatus.SENT,
                    dimse_status=status, error=error,
                )
            )  # fmt: skip


def deliver_job(
    ctx: DeliveryContext, job_id: str, destinations: Sequence[Peer] | None = None, force: bool = False
) -> DeliveryReport:
    """Deliver job ``job_id`` now, in this process (``gvr resend --now``, tests).

    A SENT job is left alone unless ``force``; an INFERRED or FAILED one is claimed
    first, so a worker delivering it at the same time is never doubled.
    Raises ``DestinationUnavailableError`` when a destination was down (retry
    later), ``DeliveryError`` when retrying cannot help (the job's state is then
    for the caller to set: ``fail_job``).
    """
    job = _job(ctx, job_id)
    if job.state == JobState.SENT and not force:
        log.info("job %s already SENT: nothing to deliver", job_id)
        return DeliveryReport(job_id, 0, ())
    with ctx.audit.session() as session:
        claim = claim_delivery(session, job_id, ctx.actor, ctx.settings.job_lease_seconds, force=True)
    if not claim.claimed:
        if claim.outcome is ClaimOutcome.TAKEN:
            raise DeliveryRefusedError(f"job {job_id} is being delivered by {job.worker} right now")
        raise DeliveryRefusedError(f"job {job_id} is {claim.state_before}: only an INFERRED job has results to deliver")
    try:
        return deliver_claimed(ctx, job_id, destinations)
    finally:
        _let_go(ctx, job_id)


def _let_go(ctx: DeliveryContext, job_id: str) -> None:
    """Give up this process's lease (a SENT or FAILED job has none left; an INFERRED one may be retried)."""
    with ctx.audit.session() as session:
        job = session.get(Job, job_id)
        if job is not None and job.worker == ctx.actor:
            job.lease_expires_at = None


def deliver_claimed(ctx: DeliveryContext, job_id: str, destinations: Sequence[Peer] | None = None) -> DeliveryReport:
    """One delivery attempt of a job this process holds; marks it SENT when every destination has every object."""
    peers = list(destinations if destinations is not None else ctx.settings.destinations)
    if not peers:
        raise DeliveryError("no destinations: set GVR_DESTINATIONS (AE@host:port, e.g. the PACS)")
    try:
        entries = prepare_outbox(ctx.spool, job_id, lambda repairs: _note_repairs(ctx, job_id, repairs),
                                 report_ood=ctx.settings.report_ood_findings)  # fmt: skip
    except FileNotFoundError as error:
        raise DeliveryError(
            f"job {job_id} has no complete inference result ({error}): analyse it again with gvr rerun {job_id}"
        ) from error
    except ResultBuildError as error:
        raise DeliveryError(f"job {job_id}: cannot build result objects: {error}") from error
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as error:
        raise DeliveryError(f"job {job_id}: cannot build result objects: {withheld(error)}") from error
    attempt = _next_attempt(ctx, job_id)
    outcomes = [_send_to(ctx, job_id, peer, entries, attempt) for peer in peers]
    report = DeliveryReport(job_id, attempt, tuple(entries), tuple(outcomes))
    if report.complete:
        _mark_sent(ctx, report)
        return report
    failures = "; ".join(f"{o.destination}: {o.error}" for o in outcomes if o.error)
    if any(o.transient for o in outcomes if o.error):
        raise DestinationUnavailableError(f"job {job_id} attempt {attempt}: {failures}")
    raise DeliveryError(f"job {job_id} attempt {attempt}: {failures}")


def _note_repairs(ctx: DeliveryContext, job_id: str, repairs: Sequence[SourceRepair]) -> None:
    """One audit event listing the source attributes the results could not copy verbatim (no values)."""
    summary = ", ".join(f"{r.keyword} {r.action}" for r in repairs)
    with ctx.audit.session() as session:
        add_event(session, "result.source_repaired", ("job", job_id), ctx.actor,
                  f"{len(repairs)} source attribute(s) not copied verbatim: {summary}"[:2000],
                  {"repairs": [r.as_dict() for r in repairs]})  # fmt: skip


def _mark_sent(ctx: DeliveryContext, report: DeliveryReport) -> None:
    with ctx.audit.session() as session:
        job = session.get(Job, report.job_id)
        if job is None:
            raise DeliveryError(f"job {report.job_id} vanished from the audit database")
        job.state, job.error, job.finished_at = JobState.SENT, None, utcnow()
        release(job)
        destinations = [o.destination for o in report.outcomes]
        add_event(
            session, "job.sent", ("job", job.id), ctx.actor,
            f"{len(report.objects)} result object(s) delivered to {', '.join(destinations)} (attempt {report.attempt})",
            {"attempt": report.attempt, "destinations": destinations,
             "objects": [{"kind": e.kind, "sop_instance_uid": e.sop_instance_uid} for e in report.objects]},
        )  # fmt: skip
    log.info("job %s SENT: %d object(s) to %d destination(s)", report.job_id, len(report.objects),
             len(report.outcomes))  # fmt: skip


def fail_job(ctx: DeliveryContext, job_id: str, reason: str) -> None:
    """Mark the job FAILED with ``reason`` and the command that tries again (a SENT job stays SENT)."""
    message = f"delivery failed: {reason}. Try again with: gvr resend {job_id}"
    with ctx.audit.session() as session:
        job = session.get(Job, job_id)
        if job is None or job.state == JobState.SENT:
            return
        job.state, job.error = JobState.FAILED, message[:4000]
        release(job)
        add_event(session, "job.failed", ("job", job_id), ctx.actor, message)
    log.error("job %s FAILED: %s", job_id, reason)


class _ProcessContext:
    """This worker process's DeliveryContext, built from ``load_settings()`` on first use."""

    def __init__(self) -> None:
        self._context: DeliveryContext | None = None

    def get(self) -> DeliveryContext:
        if self._context is None:
            self._context = DeliveryContext.load(load_settings(), "worker")
        return self._context

    def reset(self) -> None:
        """Forget the context (tests; a process whose settings changed)."""
        if self._context is not None:
            self._context.audit.dispose()
        self._context = None


PROCESS = _ProcessContext()


class DeliveryTask(Task):  # type: ignore[misc]
    """A last-resort hook: an error that escaped ``run_delivery`` still marks the job FAILED."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        job_id = job_id_argument(args, kwargs)
        reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, (OSError, DeliveryError)) else withheld(exc)
        try:
            fail_job(PROCESS.get(), job_id, reason)
        except Exception as error:  # noqa: BLE001 - the lease expiring brings the job back
            log.error("job %s failed (%s) and could not be marked FAILED: %s", job_id, reason,
                      type(error).__name__)  # fmt: skip


@shared_task(  # type: ignore[untyped-decorator]
    name=TASK_DELIVER, bind=True, base=DeliveryTask, acks_late=True, reject_on_worker_lost=True,
    soft_time_limit=600, time_limit=900,
)  # fmt: skip
def deliver_results(self: Task, job_id: str) -> str:
    """Deliver job ``job_id``: "sent", "failed", "retry scheduled" or why not started; see the module docstring."""
    ctx = PROCESS.get()
    policy = RetryPolicy.from_conf(self.app.conf)
    try:
        return run_delivery(ctx, job_id, policy)
    except OperationalError as error:
        # The audit DB is away: give the message back after a pause instead of dropping it
        # (a job claimed already is brought back by its lease expiring).
        log.warning("job %s: audit DB unreachable (%s); message returned to the queue", job_id,
                    type(error).__name__)  # fmt: skip
        time.sleep(REJECT_PAUSE_S)
        raise Reject(type(error).__name__, requeue=True) from error


def run_delivery(ctx: DeliveryContext, job_id: str, policy: RetryPolicy) -> str:
    """The task body, callable without Celery: claim the job, deliver, and leave it in a state with a reason.

    A destination that is down schedules the next try as a due time in the DB
    (``policy.delay``); the node's reconciler publishes it then. Raises only
    ``OperationalError`` (the audit DB away).
    """
    with ctx.audit.session() as session:
        claim = claim_delivery(session, job_id, ctx.actor, ctx.settings.job_lease_seconds)
    if not claim.claimed:
        log.info("job %s not delivered here: %s (was %s)", job_id, claim.outcome.value, claim.state_before or "-")
        return claim.outcome.value
    try:
        with Heartbeat(ctx.audit, job_id, ctx.actor, ctx.settings.job_lease_seconds):
            deliver_claimed(ctx, job_id)
    except DestinationUnavailableError as error:
        return _retry_or_fail(ctx, job_id, policy, str(error))
    except DeliveryError as error:
        fail_job(ctx, job_id, str(error))
        return "failed"
    except OperationalError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure ends the job with a reason, never the worker
        fail_job(ctx, job_id, withheld(error))
        return "failed"
    return "sent"


def _retry_or_fail(ctx: DeliveryContext, job_id: str, policy: RetryPolicy, reason: str) -> str:
    with ctx.audit.session() as session:
        job = session.get(Job, job_id)
        if job is None or job.state is not JobState.INFERRED or job.worker != ctx.actor:
            return "lease lost"
        if job.retries < policy.max_retries:
            schedule_retry(session, job, ctx.actor, reason, policy.delay(job.retries), "delivery.retry")
            return "retry scheduled"
        retries = job.retries
    fail_job(ctx, job_id, f"{reason} (gave up after {retries + 1} attempts)")
    return "failed"
