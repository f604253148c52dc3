"""Study assembly: when a study is complete, select its eligible images and queue a job.

When is a study complete? Fast and safe by default (``docs/reliability.md``):

- its association was *released* (the sender said it is done) and nothing more
  arrived for ``release_quiet_seconds`` (1 s), and no other open association is
  sending instances of it (``complete_on_release``, on by default);
- or no instance arrived for ``study_stable_seconds`` (30 s): a study whose
  association stays open, was aborted, or that comes over several associations
  with gaps between them.

An instance that arrives for a study already analysed makes a job of its own,
linked to the earlier one (``Job.follows_job_id``): its results go into the same
result series, numbered after the earlier job's. All state lives in the audit DB,
so a restarted node finishes what it had: stable studies get assembled and jobs
committed but never put on the broker are sent.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.audit.db import AuditDB, add_event
from node.audit.models import (
    Instance,
    InstanceStatus,
    Job,
    JobImage,
    JobState,
    Study,
    StudyState,
    as_utc,
    utcnow,
)
from node.config import Settings
from node.selection import SelectionRule, read_selection_header
from node.supervision import SupervisedLoop

log = logging.getLogger(__name__)

Enqueue = Callable[[str], None]


class Assembler:
    """Turns stable studies into queued jobs; ``run_once`` is one pass, ``start`` loops."""

    def __init__(
        self, settings: Settings, audit: AuditDB, enqueue: Enqueue, actor: str, rule: SelectionRule | None = None
    ) -> None:
        self.settings = settings
        self.audit = audit
        self.enqueue = enqueue
        self.actor = actor
        self.rule = rule or SelectionRule.from_settings(settings)
        self.in_flight: Callable[[], set[str]] = set  # studies open associations are still sending
        self._released: set[str] = set()
        self._lock = threading.Lock()
        self.loop = SupervisedLoop("assembler", self.run_once, settings.assembler_poll_seconds)

    def mark_released(self, study_uids: set[str]) -> None:
        """Called when an association is released: those studies complete after ``release_quiet_seconds``."""
        if self.settings.complete_on_release:
            with self._lock:
                self._released |= study_uids

    def run_once(self) -> list[str]:
        """Assemble every complete study, then send unsent jobs. Returns new job ids."""
        new_jobs = [job for study_id in self._complete_studies() if (job := self._assemble(study_id))]
        self.send_unsent_jobs()
        return new_jobs

    def _complete_studies(self) -> list[int]:
        now = utcnow()
        stable = now - timedelta(seconds=self.settings.study_stable_seconds)
        quiet = now - timedelta(seconds=self.settings.release_quiet_seconds)
        with self.audit.session() as session:
            rows = session.execute(
                select(Study.id, Study.study_uid, Study.last_received_at).where(
                    Study.state == StudyState.RECEIVING
                )
            ).all()
        sending = self.in_flight()
        with self._lock:
            released = self._released & {row.study_uid for row in rows}  # forget studies assembled meanwhile
            complete = [row for row in rows if as_utc(row.last_received_at) <= stable or (
                row.study_uid in released and row.study_uid not in sending and as_utc(row.last_received_at) <= quiet)]
            self._released = released - {row.study_uid for row in complete}
        return [row.id for row in complete]

    def _assemble(self, study_id: int) -> str | None:
        with self.audit.session() as session:
            study = session.get(Study, study_id)
            if study is None or study.state != StudyState.RECEIVING:
                return None
            eligible, skipped = self._select(session, study.study_uid)
            if not eligible:
                _record_no_eligible(session, study, skipped, self.actor)
                return None
            earlier = session.scalar(
                select(Job.id).where(Job.study_id == study.id).order_by(Job.created_at.desc()).limit(1)
            )
            job = Job(id=str(uuid.uuid4()), study_id=study.id, state=JobState.QUEUED, follows_job_id=earlier)
            session.add(job)
            session.add_all(JobImage(job_id=job.id, instance_id=instance_id) for instance_id in eligible)
            study.state = StudyState.ASSEMBLED
            study.assembled_at = utcnow()
            late = f"; late instance(s) of a study analysed in job {earlier}: same result series" if earlier else ""
            add_event(
                session, "job.queued", ("job", job.id), self.actor,
                f"study assembled: {len(eligible)} eligible image(s), {len(skipped)} skipped{late}",
                {"study_id": study.id, "eligible": len(eligible), "skipped": skipped, "follows_job_id": earlier},
            )  # fmt: skip
            job_id = job.id
        log.info("job %s queued for study #%d (%d images)", job_id, study_id, len(eligible))
        return job_id

    def _select(self, session: Session, study_uid: str) -> tuple[list[int], dict[str, str]]:
        """Eligible instance ids not yet in any job, and a reason for each skipped one."""
        in_jobs = select(JobImage.instance_id)
        rows = session.execute(
            select(Instance.id, Instance.sop_instance_uid, Instance.spool_path).where(
                Instance.study_uid == study_uid,
                Instance.status == InstanceStatus.ACCEPTED,
                Instance.id.not_in(in_jobs),
            )
        ).all()
        eligible: list[int] = []
        skipped: dict[str, str] = {}
        for row in rows:
            try:
                reason = self.rule.reason_to_skip(read_selection_header(Path(row.spool_path)))
            except ValueError as error:
                reason = str(error)
            if reason is None:
                eligible.append(row.id)
            else:
                skipped[row.sop_instance_uid] = reason
        return eligible, skipped

    def send_unsent_jobs(self) -> int:
        """Put committed-but-unsent jobs on the broker (after a crash or a broker outage)."""
        with self.audit.session() as session:
            job_ids = session.scalars(
                select(Job.id).where(Job.state == JobState.QUEUED, Job.enqueued_at.is_(None),
                                     Job.next_attempt_at.is_(None))  # a scheduled retry: the reconciler's, when due
                .order_by(Job.created_at)
            ).all()
        sent = 0
        for job_id in job_ids:
            try:
                self.enqueue(job_id)
            except Exception as error:  # noqa: BLE001 - kombu, redis, sqlalchemy: broker errors come in many types; retried next pass
                log.warning("job %s not yet on the broker: %s", job_id, error)
                return sent
            with self.audit.session() as session:
                job = session.get(Job, job_id)
                if job is not None:
                    job.enqueued_at = utcnow()
                    add_event(session, "job.enqueued", ("job", job_id), self.actor, "sent to queue gpu")
            sent += 1
        return sent

    # -- the background loop --------------------------------------------------------

    def start(self, on_death: Callable[[str, BaseException], None] | None = None) -> None:
        """Run ``run_once`` every ``assembler_poll_seconds`` in a supervised thread (``node.supervision``)."""
        self.loop.on_death = on_death
        self.loop.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.loop.stop(timeout)


def _record_no_eligible(session: Session, study: Study, skipped: dict[str, str], actor: str) -> None:
    reasons = sorted(set(skipped.values()))
    study.state = StudyState.NO_ELIGIBLE
    study.assembled_at = utcnow()
    study.reason = "; ".join(reasons) or "no new instances"
    add_event(
        session, "study.no_eligible", ("study", study.id), actor,
        f"no eligible image: {study.reason}", {"skipped": skipped},
    )  # fmt: skip
