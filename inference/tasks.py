"""The ``gpu`` queue's task: predict and explain one job's images, then hand over to delivery.

``inference.analyze_study(job_id)`` claims the job in the audit DB (``node.job_lease``:
one conditional UPDATE, so a duplicate message never runs it twice) and moves it
QUEUED -> RUNNING -> INFERRED (or FAILED), with an event at each step. While it
works, a heartbeat renews its lease; if the worker dies, the lease expires and
the node's reconciler publishes the job again (a re-run writes the same
artefacts, ``result.json`` last, atomically). An INFERRED or SENT job is never
recomputed; its delivery is the reconciler's to publish.

The bundle is loaded once per worker *process*, after Celery forked it
(``worker_process_init``), so CUDA is never initialised in the parent; the solo
pool, which does not fork, loads it on the first task. Settings come from
``node.config.load_settings()`` (``GVR_*``) in that process.

Transient failures (the audit DB, the spool or the broker away) schedule a retry
as a due time in the DB (2, 4, 8 ... s, at most ``MAX_RETRIES``); the worker
holds no countdown message. Anything else, or the last retry, marks the job
FAILED with a sentence. When even the claim cannot reach the DB, the message
goes back to the broker after a pause.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import kombu.exceptions
import numpy as np
from celery import Task, shared_task
from celery.exceptions import Reject
from celery.signals import worker_process_init
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from inference.bundle import Bundle, BundleInvalidError
from inference.predict import ImageExplanation, artefact_maps, explain_images, resolve_bundle
from inference.preprocess import Geometry, UnusableImageError, spooled_dicom_to_model_image
from inference.rationale import RationaleConfig
from inference.worker_app import RATIONALE_CONF_KEY
from node.artefacts import ImageResult, JobResult, ModelInfo, write_job_result
from node.audit.db import AuditDB, actor_name, add_event
from node.audit.models import Job, JobImage, JobState, utcnow
from node.celery_app import QUEUE_DICOM, TASK_ANALYZE, TASK_DELIVER, job_id_argument
from node.config import Settings, load_settings
from node.job_lease import Claim, Heartbeat, claim_analysis, end_failed, schedule_retry, start_phase
from node.limits import ResourceLimits
from node.spool import Spool, process_owner, uid_to_filename
from node.supervision import describe_error, withheld

logger = logging.getLogger(__name__)

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OperationalError, OSError, kombu.exceptions.OperationalError)
MAX_RETRIES = 5
REJECT_PAUSE_S = 2.0  # the audit DB is away: wait this long before giving a message back


class WorkerSetupError(RuntimeError):
    """The worker process cannot load its bundle or device: no job can run here."""


class LeaseLostError(RuntimeError):
    """This worker's lease expired and the job went to another worker: its result is not recorded."""


@dataclass(frozen=True)
class WorkerContext:
    """What one worker process holds for its whole life."""

    settings: Settings
    audit: AuditDB
    spool: Spool
    bundle: Bundle
    actor: str

    @classmethod
    def load(cls, settings: Settings) -> WorkerContext:
        bundle = resolve_bundle(settings.bundle_dir, settings.device)
        logger.info("worker loaded bundle %s %s on %s", bundle.manifest.name, bundle.manifest.version,
                    settings.device)
        spool = Spool(settings.spool_dir, owner=process_owner("worker"))
        spool.clear_partial_writes()  # this host's dead processes' leftovers; never a live one's
        return cls(settings, AuditDB(settings.audit_url), spool, bundle, actor_name("worker"))


class _ProcessContext:
    """Holds this process's WorkerContext (one per process; filled after the fork)."""

    def __init__(self) -> None:
        self._context: WorkerContext | None = None

    def get(self) -> WorkerContext:
        if self._context is None:
            self._context = WorkerContext.load(load_settings())
        return self._context

    def loaded(self) -> WorkerContext | None:
        """The context if this process has one (a failed bundle load leaves none)."""
        return self._context

    def reset(self) -> None:
        self._context = None


PROCESS = _ProcessContext()


@dataclass(frozen=True)
class _AuditOnly:
    """Enough to mark a job FAILED when the bundle (or the device) cannot be loaded."""

    audit: AuditDB
    actor: str

    @classmethod
    def load(cls) -> _AuditOnly:
        return cls(AuditDB(load_settings().audit_url), actor_name("worker"))


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _load_in_child(**_kwargs: Any) -> None:
    """A prefork child: forget anything inherited, load the bundle here (CUDA after the fork)."""
    PROCESS.reset()
    PROCESS.get()


@dataclass(frozen=True)
class _Source:
    instance_id: int
    sop_instance_uid: str
    path: str


@dataclass(frozen=True)
class _Prepared:
    source: _Source
    image: np.ndarray
    geometry: Geometry


def _start(ctx: WorkerContext, job_id: str) -> tuple[Claim, list[_Source], int]:
    """Claim the job for this worker (``node.job_lease``): the claim, the job's sources and the
    instance number its results start at (after the images of earlier jobs of the same study)."""
    with ctx.audit.session() as session:
        claim = claim_analysis(session, job_id, ctx.actor, ctx.settings.device, ctx.settings.job_lease_seconds)
        if not claim.claimed:
            return claim, [], 1
        job = session.get(Job, job_id)
        assert job is not None  # just claimed in this session
        sources = [_Source(ji.instance.id, ji.instance.sop_instance_uid or "", ji.instance.spool_path or "")
                   for ji in job.images]
        earlier_images = session.scalar(
            select(func.count(JobImage.id)).join(Job, JobImage.job_id == Job.id)
            .where(Job.study_id == job.study_id, Job.created_at < job.created_at)
        ) or 0  # fmt: skip
    return claim, sources, int(earlier_images) + 1


def _prepare(
    sources: list[_Source], resolution: int, limits: ResourceLimits
) -> tuple[list[_Prepared], dict[str, str]]:
    """Read and preprocess each source; an unusable one is skipped with its reason (a sentence).

    issue 9: the resource limits are checked again before anything is decoded, and an image
    that still fails (out of memory, a library error) is skipped: it never ends the worker.
    """
    prepared, skipped = [], {}
    for source in sources:
        try:
            if not source.path:
                raise UnusableImageError("the instance has no spooled file")
            image, geometry = spooled_dicom_to_model_image(source.path, resolution, limits)
        except UnusableImageError as exc:
            skipped[source.sop_instance_uid] = str(exc)
            continue
        except MemoryError as exc:
            skipped[source.sop_instance_uid] = f"preprocessing needed more memory than this worker has ({describe_error(exc)})"
            continue
        except Exception as exc:  # noqa: BLE001 - one bad image must not end the job, nor the worker
            skipped[source.sop_instance_uid] = f"preprocessing failed ({describe_error(exc)})"
            continue
        prepared.append(_Prepared(source, image, geometry))
    return prepared, skipped


def _record_skipped(ctx: WorkerContext, job_id: str, sources: list[_Source], skipped: dict[str, str]) -> None:
    if not skipped:
        return
    with ctx.audit.session() as session:
        for source in sources:
            if source.sop_instance_uid in skipped:
                add_event(session, "image.unusable", ("instance", source.instance_id), ctx.actor,
                          f"skipped for job {job_id}: {skipped[source.sop_instance_uid]}",
                          {"job_id": job_id, "sop_instance_uid": source.sop_instance_uid})


def _fail(ctx: WorkerContext | _AuditOnly, job_id: str, reason: str) -> None:
    """End the job FAILED with ``reason`` (a sentence) and the command that runs it again."""
    message = f"{reason}. Run it again with: gvr rerun {job_id}"
    with ctx.audit.session() as session:
        job = session.get(Job, job_id)
        if job is None or job.state in (JobState.INFERRED, JobState.SENT):
            return
        end_failed(session, job, ctx.actor, message)
    logger.error("job %s failed: %s", job_id, reason)


def _image_result(item: _Prepared, explanation: ImageExplanation, threshold: float) -> ImageResult:
    return ImageResult(
        key=uid_to_filename(item.source.sop_instance_uid), source_sop_instance_uid=item.source.sop_instance_uid,
        source_path=item.source.path, probability=explanation.probability,
        probability_healthy=explanation.probability_healthy, positive=explanation.probability >= threshold,
        steps=explanation.steps, ood_score=explanation.ood_score, ood_flag=explanation.ood_flag,
    )


def _finish(ctx: WorkerContext, result: JobResult, skipped: dict[str, str]) -> dict[str, Any]:
    summary = {
        "model": result.model.name, "version": result.model.version, "threshold": result.model.threshold,
        "device": result.device, "seconds": round(result.seconds, 3), "skipped": skipped,
        "result_dir": str(ctx.spool.results / result.job_id),
        "images": [{k: v for k, v in asdict(image).items() if k != "source_path"} for image in result.images],
    }
    with ctx.audit.session() as session:
        job = session.get(Job, result.job_id)
        if job is None:
            raise LookupError(f"job {result.job_id} vanished from the audit DB while it ran")
        if job.worker != ctx.actor or job.state is not JobState.RUNNING:
            raise LeaseLostError(f"job {result.job_id} is {job.state.value} with {job.worker}; result not recorded")
        start_phase(job, JobState.INFERRED)
        job.finished_at, job.result = utcnow(), summary
        job.model_version = f"{result.model.name}-{result.model.version}"[:64]
        add_event(session, "job.inferred", ("job", result.job_id), ctx.actor,
                  f"{len(result.images)} image(s) explained in {result.seconds:.1f} s",
                  {"positives": sum(image.positive for image in result.images), "skipped": len(skipped)})
    return summary


def run_analysis(ctx: WorkerContext, job_id: str, send_deliver: Callable[[str], None],
                 config: RationaleConfig | None = None) -> str:
    """The task's body, free of Celery: returns what happened ("inferred", "failed", "retry scheduled", ...).

    Every failure ends here with a state in the audit DB: a transient one (the DB,
    the spool or the broker away) schedules a retry (a due time the node's
    reconciler acts on), anything else ends the job FAILED with a sentence.

    Raises:
        one of TRANSIENT_ERRORS when even the claim could not reach the audit DB.
    """
    claim, sources, first_number = _start(ctx, job_id)
    if not claim.claimed:
        logger.info("job %s not started here: %s (was %s)", job_id, claim.outcome.value, claim.state_before or "-")
        return claim.outcome.value
    try:
        with Heartbeat(ctx.audit, job_id, ctx.actor, ctx.settings.job_lease_seconds):
            outcome = _analyse(ctx, job_id, sources, config, first_number)
    except TRANSIENT_ERRORS as error:
        return _retry_later(ctx, job_id, error)
    except LeaseLostError as error:
        logger.warning("%s", error)
        return "lease lost"
    except Exception as error:  # noqa: BLE001 - any failure ends the job with a reason, never the worker
        _fail(ctx, job_id, failure_sentence("inference", error))
        return "failed"
    if outcome == "inferred":
        publish_delivery(ctx, job_id, send_deliver)
    return outcome


def _analyse(ctx: WorkerContext, job_id: str, sources: list[_Source], config: RationaleConfig | None,
             first_number: int = 1) -> str:
    started = time.perf_counter()
    manifest = ctx.bundle.manifest
    prepared, skipped = _prepare(sources, manifest.resolution, ResourceLimits.from_settings(ctx.settings))
    _record_skipped(ctx, job_id, sources, skipped)
    if not prepared:
        reasons = "; ".join(f"{uid}: {why}" for uid, why in skipped.items()) or "the job lists no image"
        _fail(ctx, job_id, f"no usable image: {reasons}")
        return "failed"
    explanations = explain_images(ctx.bundle, [p.image for p in prepared], config)
    model = ModelInfo(manifest.name, manifest.version, manifest.decision_threshold, manifest.bnp_threshold,
                      manifest.rationale_scale)
    images = tuple(_image_result(p, e, model.threshold) for p, e in zip(prepared, explanations, strict=True))
    result = JobResult(job_id, model, ctx.settings.device, images, time.perf_counter() - started, first_number)
    arrays = {image.key: artefact_maps(e, p.geometry) for image, p, e in zip(images, prepared, explanations, strict=True)}
    write_job_result(ctx.spool.results, result, arrays)
    _finish(ctx, result, skipped)
    logger.info("job %s inferred: %d image(s), %d skipped, %.1f s", job_id, len(images), len(skipped),
                result.seconds)
    return "inferred"


def retry_delay(retries_so_far: int) -> float:
    """Seconds before the next try of a transient failure: 2, 4, 8 ... at most 120."""
    return float(min(120, 2 * 2**retries_so_far))


def _retry_later(ctx: WorkerContext, job_id: str, error: BaseException) -> str:
    """Schedule the next try in the DB; if the DB is away too, the lease expiring brings the job back."""
    reason = failure_sentence("inference", error)
    try:
        with ctx.audit.session() as session:
            job = session.get(Job, job_id)
            if job is None or job.state is not JobState.RUNNING or job.worker != ctx.actor:
                return "lease lost"
            if job.retries >= MAX_RETRIES:
                failed = True
            else:
                failed = False
                schedule_retry(session, job, ctx.actor, reason, retry_delay(job.retries), "job.retry")
        if failed:
            _fail(ctx, job_id, f"{reason} (gave up after {MAX_RETRIES} retries)")
            return "failed"
    except TRANSIENT_ERRORS:
        logger.warning("job %s: %s; the audit DB is away too, its lease will expire and it runs again",
                       job_id, reason)  # fmt: skip
    return "retry scheduled"


def publish_delivery(ctx: WorkerContext, job_id: str, send_deliver: Callable[[str], None]) -> None:
    """Hand an INFERRED job to the delivery queue; if the broker is away the reconciler publishes it."""
    try:
        send_deliver(job_id)
        with ctx.audit.session() as session:
            job = session.get(Job, job_id)
            if job is not None and job.state is JobState.INFERRED and job.enqueued_at is None:
                job.enqueued_at = utcnow()
    except Exception as error:  # noqa: BLE001 - kombu, redis, sqlalchemy: the reconciler covers every one
        logger.warning("job %s inferred; delivery not yet published (%s): the node will publish it",
                       job_id, type(error).__name__)  # fmt: skip


def failure_sentence(what: str, error: BaseException) -> str:
    """A sentence for the audit: our own errors speak for themselves, library ones by type and place."""
    if isinstance(error, MemoryError):
        return f"{what} ran out of memory ({describe_error(error)})"
    if isinstance(error, (UnusableImageError, BundleInvalidError, WorkerSetupError)):
        return f"{what} failed: {error}"
    if isinstance(error, OSError):
        return f"{what} failed: {type(error).__name__}: {error.strerror or error}"
    return f"{what} failed unexpectedly: {withheld(error)}"


class AnalysisTask(Task):  # type: ignore[misc]
    """A last-resort hook: an error that escaped ``run_analysis`` still marks the job FAILED."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        job_id = job_id_argument(args, kwargs)
        try:
            _fail(PROCESS.loaded() or _AuditOnly.load(), job_id, failure_sentence("inference", exc))
        except Exception as error:  # noqa: BLE001 - the lease expiring brings the job back
            logger.error("job %s failed (%s) and could not be marked FAILED: %s", job_id, type(exc).__name__,
                         type(error).__name__)  # fmt: skip


@shared_task(  # type: ignore[untyped-decorator]
    name=TASK_ANALYZE, bind=True, base=AnalysisTask, acks_late=True, reject_on_worker_lost=True,
    soft_time_limit=1500, time_limit=1800,
)
def analyze_study(self: Task, job_id: str) -> str:
    """Predict and explain job ``job_id``; see the module docstring."""
    try:
        ctx = PROCESS.get()
    except Exception as error:  # a bad bundle, a missing file, no CUDA: each ends the job with why
        raise WorkerSetupError(f"the worker cannot load its model bundle ({type(error).__name__}: {error}); "
                               "fix the bundle or the device, then run the job again") from error  # fmt: skip
    options = self.app.conf.get(RATIONALE_CONF_KEY) or {}
    config = RationaleConfig(**options)

    def send_deliver(target: str) -> None:
        self.app.send_task(TASK_DELIVER, args=[target], queue=QUEUE_DICOM, retry=False)

    try:
        return run_analysis(ctx, job_id, send_deliver, config)
    except TRANSIENT_ERRORS as error:
        # The audit DB is away, so the job cannot even be claimed: give the message back to the
        # broker after a pause (this worker holds nothing meanwhile) instead of dropping it.
        logger.warning("job %s: audit DB unreachable (%s); message returned to the queue", job_id,
                       type(error).__name__)  # fmt: skip
        time.sleep(REJECT_PAUSE_S)
        raise Reject(str(type(error).__name__), requeue=True) from error
