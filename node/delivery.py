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

Settings come from ``node.config.load_settings()`` (``GVR_*``) once per
worker process; the retry policy from the app's ``gvr_delivery`` conf key.
Never imports torch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from celery import Task, shared_task
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from node.audit.db import AuditDB, actor_name, add_event
from node.audit.models import Delivery, DeliveryStatus, Job, JobState
from node.celery_app import TASK_DELIVER, job_id_argument
from node.config import Peer, Settings, load_settings
from node.results.build import OutboxEntry, ResultBuildError, outbox_path, prepare_outbox
from node.results.source_header import SourceRepair
from node.scu import FileToSend, PeerUnreachableError, SendResult, send_files
from node.spool import Spool
from node.supervision import describe_error

log = logging.getLogger(__name__)
DELIVERY_CONF_KEY = "gvr_delivery"  # app.conf key: RetryPolicy fields, e.g. {"max_retries": 3}
_OUT_OF_RESOURCES = 0xA700


class DeliveryError(RuntimeError):
    """Delivery cannot succeed by retrying (refused objects, no destinations, no results)."""


class DestinationUnavailableError(DeliveryError):
    """At least one destination was down or busy: retrying later may succeed."""


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
        return cls(settings, AuditDB(settings.audit_url), Spool(settings.spool_dir), actor_name(role))


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
            raise DeliveryError(f"job {job_id} is not in the audit database {ctx.settings.audit_url}")
        return job


def _next_attempt(ctx: DeliveryContext, job_id: str) -> int:
    with ctx.audit.session() as session:
        last = session.scalar(select(func.max(Delivery.attempt)).where(Delivery.job_id == job_id))
    return int(last or 0) + 1


def _already_delivered(
    ctx: DeliveryContext, job_id: str, destination: str, entries: Sequence[OutboxEntry]
) -> bool:
    with ctx.audit.session() as session:
        sent = set(
            session.scalars(
                select(Delivery.sop_instance_uid).where(
                    Delivery.job_id == job_id,
                    Delivery.destination == destination,
                    Delivery.status == DeliveryStatus.SENT,
                )
            )
        )
    return all(entry.sop_instance_uid in sent for entry in entries)


def _transient_status(result: SendResult) -> bool:
    return result.status is None or result.status & 0xFF00 == _OUT_OF_RESOURCES


def _send_to(
    ctx: DeliveryContext, job_id: str, peer: Peer, entries: Sequence[OutboxEntry], attempt: int
) -> DestinationOutcome:
    """One association to ``peer`` carrying every object; one Delivery row per object."""
    files = [FileToSend(outbox_path(ctx.spool, job_id, e), e.sop_class_uid, e.sop_instance_uid,
                        e.transfer_syntax) for e in entries]  # fmt: skip
    settings = ctx.settings
    try:
        results = send_files(files, peer, settings.ae_title, timeout=settings.dimse_timeout)
    except (PeerUnreachableError, OSError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        _record(ctx, job_id, str(peer), attempt, [(e, None, reason) for e in entries])
        log.warning("job %s: destination %s unavailable (attempt %d): %s", job_id, peer, attempt, reason)
        return DestinationOutcome(str(peer), 0, len(entries), transient=True, error=reason)
    rows: list[tuple[OutboxEntry, int | None, str | None]] = []
    failed, transient = 0, False
    for entry, result in zip(entries, results, strict=True):
        error: str | None = None
        if not result.ok:
            failed += 1
            transient = transient or _transient_status(result)
            status = "no status" if result.status is None else f"status 0x{result.status:04X}"
            error = result.error or f"C-STORE of {entry.kind} {entry.sop_instance_uid} refused with {status}"
        rows.append((entry, result.status, error))
    _record(ctx, job_id, str(peer), attempt, rows)
    first_error = next((row[2] for row in rows if row[2]), None)
    return DestinationOutcome(
        str(peer), len(entries) - failed, failed, transient=transient, error=first_error
    )


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
    """One delivery attempt of job ``job_id``; marks it SENT when every destination has every object.

    A SENT job is left alone unless ``force``. Raises ``DestinationUnavailableError``
    when a destination was down (retry later), ``DeliveryError`` when retrying
    cannot help (the job's state is then for the caller to set: ``fail_job``).
    """
    job = _job(ctx, job_id)
    if job.state == JobState.SENT and not force:
        log.info("job %s already SENT: nothing to deliver", job_id)
        return DeliveryReport(job_id, 0, ())
    if job.state not in (JobState.INFERRED, JobState.FAILED, JobState.SENT):
        raise DeliveryError(f"job {job_id} is {job.state.value}: only an INFERRED job has results to deliver")
    peers = list(destinations if destinations is not None else ctx.settings.destinations)
    if not peers:
        raise DeliveryError("no destinations: set GVR_DESTINATIONS (AE@host:port, e.g. the PACS)")
    try:
        entries = prepare_outbox(ctx.spool, job_id, lambda repairs: _note_repairs(ctx, job_id, repairs),
                                 report_ood=ctx.settings.report_ood_findings)  # fmt: skip
    except FileNotFoundError as error:
        raise DeliveryError(
            f"job {job_id} has no complete inference result ({error}): analyse it again"
        ) from error
    except ResultBuildError as error:
        raise DeliveryError(f"job {job_id}: cannot build result objects: {error}") from error
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as error:
        raise DeliveryError(f"job {job_id}: cannot build result objects: {withheld(error)}") from error
    attempt = _next_attempt(ctx, job_id)
    outcomes = []
    for peer in peers:
        if _already_delivered(ctx, job_id, str(peer), entries):
            outcomes.append(DestinationOutcome(str(peer), 0, 0, skipped=True))
        else:
            outcomes.append(_send_to(ctx, job_id, peer, entries, attempt))
    report = DeliveryReport(job_id, attempt, tuple(entries), tuple(outcomes))
    if report.complete:
        _mark_sent(ctx, report)
        return report
    failures = "; ".join(f"{o.destination}: {o.error}" for o in outcomes if o.error)
    if any(o.transient for o in outcomes if o.error):
        raise DestinationUnavailableError(f"job {job_id} attempt {attempt}: {failures}")
    raise DeliveryError(f"job {job_id} attempt {attempt}: {failures}")


def withheld(error: BaseException) -> str:
    """The error's type and where it was raised, not its message: library messages quote values (PHI)."""
    return f"{describe_error(error)} (message withheld: it may quote patient data)"


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
        job.state, job.error = JobState.SENT, None
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
        add_event(session, "job.failed", ("job", job_id), ctx.actor, message)
    log.error("job %s FAILED: %s", job_id, reason)


def note_retry(ctx: DeliveryContext, job_id: str, reason: str, delay: float, retries: int) -> None:
    with ctx.audit.session() as session:
        add_event(session, "delivery.retry", ("job", job_id), ctx.actor,
                  f"retry {retries + 1} in {delay:.0f} s: {reason}", {"delay_s": delay, "retry": retries + 1})  # fmt: skip


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
    """Only a failure hook: an unexpected error (not a scheduled retry) marks the job FAILED."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        job_id = job_id_argument(args, kwargs)
        reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, (OSError, DeliveryError)) else withheld(exc)
        try:
            fail_job(PROCESS.get(), job_id, reason)
        except OperationalError as error:
            log.error("job %s failed (%s) and could not be marked FAILED: %s", job_id, reason,
                      type(error).__name__)  # fmt: skip


@shared_task(  # type: ignore[untyped-decorator]
    name=TASK_DELIVER, bind=True, base=DeliveryTask, acks_late=True, reject_on_worker_lost=True,
    autoretry_for=(OperationalError,), retry_backoff=2, retry_backoff_max=60, max_retries=10,
    soft_time_limit=600, time_limit=900,
)  # fmt: skip
def deliver_results(self: Task, job_id: str) -> str:
    """Deliver job ``job_id``: "sent" or "failed", or a retry scheduled; see the module docstring."""
    ctx = PROCESS.get()
    policy = RetryPolicy.from_conf(self.app.conf)
    return run_delivery(ctx, job_id, policy, self.request.retries, self.retry)


def run_delivery(ctx: DeliveryContext, job_id: str, policy: RetryPolicy, retries: int, retry: Any) -> str:
    """The task body, callable without Celery: ``retry(countdown=, exc=, max_retries=)`` schedules the next try."""
    try:
        deliver_job(ctx, job_id)
    except DestinationUnavailableError as error:
        if retries >= policy.max_retries:
            fail_job(ctx, job_id, f"{error} (gave up after {retries + 1} attempts)")
            return "failed"
        delay = policy.delay(retries)
        note_retry(ctx, job_id, str(error), delay, retries)
        raise retry(countdown=delay, exc=error, max_retries=policy.max_retries) from error
    except DeliveryError as error:
        fail_job(ctx, job_id, str(error))
        return "failed"
    return "sent"
