"""The ``gpu`` queue's task: predict and explain one job's images, then hand over to delivery.

``inference.analyze_study(job_id)`` re-reads the job from the audit DB and moves it
QUEUED/RUNNING -> RUNNING -> INFERRED (or FAILED), with an event at each step. It
is safe to run twice: an INFERRED or SENT job is not recomputed (an INFERRED one
gets its delivery re-sent, in case the first send was lost), and a re-run after
a killed worker writes the same artefacts, by ``result.json`` last, atomically.

The bundle is loaded once per worker *process*, after Celery forked it
(``worker_process_init``), so CUDA is never initialised in the parent; the solo
pool, which does not fork, loads it on the first task. Settings come from
``node.config.load_settings()`` (``GVR_*``) in that process.

Transient failures (the audit DB locked or away, the spool or the broker
failing) are retried with exponential backoff, at most ``MAX_RETRIES`` times;
anything else, or the last retry, marks the job FAILED with the reason.
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
from celery.signals import worker_process_init
from sqlalchemy.exc import OperationalError

from inference.bundle import Bundle
from inference.predict import ImageExplanation, artefact_maps, explain_images, resolve_bundle
from inference.preprocess import Geometry, UnusableImageError, spooled_dicom_to_model_image
from inference.rationale import RationaleConfig
from inference.worker_app import RATIONALE_CONF_KEY
from node.artefacts import ImageResult, JobResult, ModelInfo, write_job_result
from node.audit.db import AuditDB, actor_name, add_event
from node.audit.models import Job, JobState, utcnow
from node.celery_app import QUEUE_DICOM, TASK_ANALYZE, TASK_DELIVER, attempts_exhausted, job_id_argument
from node.config import Settings, load_settings
from node.limits import ResourceLimits
from node.spool import Spool, uid_to_filename
from node.supervision import describe_error

logger = logging.getLogger(__name__)

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OperationalError, OSError, kombu.exceptions.OperationalError)
MAX_RETRIES = 5


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
        return cls(settings, AuditDB(settings.audit_url), Spool(settings.spool_dir), bundle, actor_name("worker"))


class _ProcessContext:
    """Holds this process's WorkerContext (one per process; filled after the fork)."""

    def __init__(self) -> None:
        self._context: WorkerContext | None = None

    def get(self) -> WorkerContext:
        if self._context is None:
            self._context = WorkerContext.load(load_settings())
        return self._context

    def reset(self) -> None:
        self._context = None


PROCESS = _ProcessContext()


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


def _start(ctx: WorkerContext, job_id: str) -> tuple[str, list[_Source]]:
    """Mark the job RUNNING (or say why not): returns (state before, its sources)."""
    with ctx.audit.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            return "missing", []
        before = job.state.value
        if job.state in (JobState.INFERRED, JobState.SENT):
            return before, []
        # RUNNING at a start means the previous start's worker died (a transient error sets QUEUED first)
        if job.state is JobState.RUNNING and attempts_exhausted(job.attempts):
            reason = (f"gave up after {job.attempts} attempts: each worker running this job died "
                      "(out of memory, killed); gvr audit shows the attempts")
            job.state, job.error, job.finished_at = JobState.FAILED, reason, utcnow()
            add_event(session, "job.failed", ("job", job_id), ctx.actor, reason, {"previous_state": before})
            return "exhausted", []
        job.state = JobState.RUNNING
        job.attempts += 1
        job.worker, job.device = ctx.actor, ctx.settings.device
        job.started_at, job.finished_at, job.error = utcnow(), None, None
        add_event(session, "job.running", ("job", job_id), ctx.actor,
                  f"inference attempt {job.attempts} on {ctx.settings.device}", {"previous_state": before})
        sources = [_Source(ji.instance.id, ji.instance.sop_instance_uid or "", ji.instance.spool_path or "")
                   for ji in job.images]
    return before, sources


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


def _fail(ctx: WorkerContext, job_id: str, reason: str) -> None:
    with ctx.audit.session() as session:
        job = session.get(Job, job_id)
        if job is None or job.state in (JobState.INFERRED, JobState.SENT):
            return
        job.state, job.error, job.finished_at = JobState.FAILED, reason, utcnow()
        add_event(session, "job.failed", ("job", job_id), ctx.actor, reason)
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
        job.state, job.finished_at, job.result = JobState.INFERRED, utcnow(), summary
        job.model_version = f"{result.model.name}-{result.model.version}"[:64]
        add_event(session, "job.inferred", ("job", result.job_id), ctx.actor,
                  f"{len(result.images)} image(s) explained in {result.seconds:.1f} s",
                  {"positives": sum(image.positive for image in result.images), "skipped": len(skipped)})
    return summary


def run_analysis(ctx: WorkerContext, job_id: str, send_deliver: Callable[[str], None],
                 config: RationaleConfig | None = None) -> str:
    """The task's body, free of Celery: returns what happened ("inferred", "failed", "already ...").

    Raises:
        one of TRANSIENT_ERRORS: worth retrying; anything else is a bug or a bad bundle.
    """
    before, sources = _start(ctx, job_id)
    if before == "missing":
        logger.error("job %s is not in the audit DB; nothing to do", job_id)
        return "missing"
    if before == "exhausted":
        logger.error("job %s exceeded its attempts and is FAILED", job_id)
        return "failed"
    if before == JobState.SENT.value:
        logger.info("job %s was already sent; not recomputed", job_id)
        return "already sent"
    if before == JobState.INFERRED.value:
        logger.info("job %s was already inferred; delivery re-sent", job_id)
        send_deliver(job_id)
        return "already inferred"
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
    result = JobResult(job_id, model, ctx.settings.device, images, time.perf_counter() - started)
    arrays = {image.key: artefact_maps(e, p.geometry) for image, p, e in zip(images, prepared, explanations, strict=True)}
    write_job_result(ctx.spool.results, result, arrays)
    _finish(ctx, result, skipped)
    send_deliver(job_id)
    logger.info("job %s inferred: %d image(s), %d skipped, %.1f s", job_id, len(images), len(skipped),
                result.seconds)
    return "inferred"


def _requeue(ctx: WorkerContext, job_id: str, reason: str) -> None:
    with ctx.audit.session() as session:
        job = session.get(Job, job_id)
        if job is None or job.state is not JobState.RUNNING:
            return
        job.state = JobState.QUEUED
        add_event(session, "job.retry", ("job", job_id), ctx.actor, f"transient error, retried: {reason}")


class AnalysisTask(Task):  # type: ignore[misc]
    """Two hooks: a retry puts the job back to QUEUED (so the redelivery cap counts only dead
    workers), the final failure (not a retry) marks it FAILED."""

    def on_retry(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        job_id = job_id_argument(args, kwargs)
        try:
            _requeue(PROCESS.get(), job_id, f"{type(exc).__name__}: {exc}")
        except TRANSIENT_ERRORS as error:
            logger.warning("job %s will be retried (%s); its state stays RUNNING: %s", job_id, exc, error)

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        job_id = job_id_argument(args, kwargs)
        try:
            _fail(PROCESS.get(), job_id, f"{type(exc).__name__}: {exc}")
        except TRANSIENT_ERRORS as error:
            logger.error("job %s failed (%s) and could not be marked FAILED: %s", job_id, exc, error)


@shared_task(  # type: ignore[untyped-decorator]
    name=TASK_ANALYZE, bind=True, base=AnalysisTask, acks_late=True, reject_on_worker_lost=True,
    autoretry_for=TRANSIENT_ERRORS, max_retries=MAX_RETRIES, retry_backoff=2, retry_backoff_max=120,
    retry_jitter=True, soft_time_limit=1500, time_limit=1800,
)
def analyze_study(self: Task, job_id: str) -> str:
    """Predict and explain job ``job_id``; see the module docstring."""
    ctx = PROCESS.get()
    options = self.app.conf.get(RATIONALE_CONF_KEY) or {}
    config = RationaleConfig(**options)

    def send_deliver(target: str) -> None:
        self.app.send_task(TASK_DELIVER, args=[target], queue=QUEUE_DICOM)

    return run_analysis(ctx, job_id, send_deliver, config)

