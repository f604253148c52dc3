"""What the review pages read from the audit DB: a filtered page of jobs, one job's story, recent failures.

Every list is paginated or capped, so a page costs the same with 10,000 jobs as
with 10. A job's outcome (finding, probability, OOD) is its first image's, as in
``Job.result`` (the inference worker's summary); the job page shows every image.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, false, func, or_, select, true
from sqlalchemy.orm import Session

from node.audit.models import Association, Delivery, Event, Instance, Job, JobImage, JobState, Study
from node.study_key import looks_like_key, study_key

PAGE_SIZE = 50
TIMELINE_LIMIT = 500
FINDINGS = {"likely": "heart failure likely", "unlikely": "heart failure unlikely", "none": "no finding (OOD)"}
OOD_CHOICES = {"yes": "out of distribution", "no": "in distribution"}


@dataclass(frozen=True)
class JobFilters:
    """The jobs list's query string, checked: a bad value is dropped and named in ``problems``."""

    state: str = ""
    finding: str = ""  # a key of FINDINGS
    ood: str = ""  # a key of OOD_CHOICES
    since: date | None = None
    until: date | None = None  # inclusive
    q: str = ""  # a study UID or key, or the start of a study UID or of a job id
    page: int = 1
    problems: tuple[str, ...] = ()

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> JobFilters:
        problems: list[str] = []

        def choice(name: str, allowed: Any) -> str:
            value = params.get(name, "").strip()
            if value and value not in allowed:
                problems.append(f"unknown {name} {value!r} ignored")
                return ""
            return value

        def day(name: str) -> date | None:
            value = params.get(name, "").strip()
            try:
                return date.fromisoformat(value) if value else None
            except ValueError:
                problems.append(f"{name} {value!r} is not a date (YYYY-MM-DD): ignored")
                return None

        page = params.get("page", "1")
        return cls(
            state=choice("state", {s.value for s in JobState}), finding=choice("finding", FINDINGS),
            ood=choice("ood", OOD_CHOICES), since=day("since"), until=day("until"),
            q=params.get("q", "").strip()[:128], page=max(int(page), 1) if page.isdigit() else 1,
            problems=tuple(problems),
        )  # fmt: skip

    def query_string(self, **changes: Any) -> str:
        """These filters as a query string (for pagination links), with ``changes`` applied."""
        values = {"state": self.state, "finding": self.finding, "ood": self.ood, "q": self.q,
                  "since": self.since.isoformat() if self.since else "",
                  "until": self.until.isoformat() if self.until else "", "page": self.page}  # fmt: skip
        values.update(changes)
        from urllib.parse import urlencode

        return urlencode({k: v for k, v in values.items() if v not in ("", None, 1)})


@dataclass(frozen=True)
class Outcome:
    """A job's result in words: finding, probability, OOD flag (None while there is no result)."""

    finding: str | None
    probability: float | None
    ood: bool | None

    @classmethod
    def of(cls, result: dict[str, Any] | None) -> Outcome:
        images = (result or {}).get("images") or []
        return image_outcome(images[0]) if images else cls(None, None, None)


def image_outcome(image: dict[str, Any]) -> Outcome:
    """One image of ``Job.result``: the finding as ``ImageResult.finding`` words it."""
    ood = bool(image.get("ood_flag"))
    if ood:
        finding = "no finding (image unlike the training data)"
    else:
        finding = "heart failure likely" if image.get("positive") else "heart failure unlikely"
    probability = image.get("probability")
    return Outcome(finding, float(probability) if isinstance(probability, int | float) else None, ood)


@dataclass(frozen=True)
class JobRow:
    id: str
    state: str
    study_uid: str
    created_at: datetime
    updated_at: datetime
    attempts: int
    error: str | None
    outcome: Outcome

    @property
    def study_key(self) -> str:
        return study_key(self.study_uid)


@dataclass(frozen=True)
class JobPage:
    rows: list[JobRow]
    total: int
    page: int
    pages: int


def _first_image(name: str) -> ColumnElement[bool]:
    flag: ColumnElement[bool] = Job.result[("images", 0, name)].as_boolean()
    return flag


def _conditions(filters: JobFilters, keyed_study_ids: list[int]) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if filters.state:
        where.append(Job.state == JobState(filters.state))
    positive, ood = _first_image("positive"), _first_image("ood_flag")
    if filters.finding == "likely":
        where += [positive == true(), ood == false()]
    elif filters.finding == "unlikely":
        where += [positive == false(), ood == false()]
    elif filters.finding == "none":
        where.append(ood == true())
    if filters.ood:
        where.append(ood == (true() if filters.ood == "yes" else false()))
    if filters.since:
        where.append(Job.created_at >= datetime.combine(filters.since, time(), UTC))
    if filters.until:
        where.append(Job.created_at < datetime.combine(filters.until + timedelta(days=1), time(), UTC))
    if filters.q:
        prefix = filters.q.replace("\\", "").replace("%", "").replace("_", "\\_") + "%"
        where.append(or_(Study.study_uid == filters.q, Study.study_uid.like(prefix, escape="\\"),
                         Job.id.like(prefix, escape="\\"), Job.study_id.in_(keyed_study_ids)))  # fmt: skip
    return where


def list_jobs(session: Session, filters: JobFilters, keys: StudyKeys | None = None,
              page_size: int = PAGE_SIZE) -> JobPage:  # fmt: skip
    """One page of jobs, newest first, and how many match in all."""
    where = _conditions(filters, (keys or StudyKeys()).study_ids(session, filters.q))
    base: Select[Job, str] = select(Job, Study.study_uid).join(Study, Job.study_id == Study.id).where(and_(true(), *where))
    total = int(session.scalar(select(func.count()).select_from(base.subquery())) or 0)
    pages = max((total + page_size - 1) // page_size, 1)
    page = min(filters.page, pages)
    rows = session.execute(
        base.order_by(Job.created_at.desc(), Job.id).offset((page - 1) * page_size).limit(page_size)
    ).all()
    return JobPage([_row(job, study_uid) for job, study_uid in rows], total, page, pages)


class StudyKeys:
    """Study id -> key (``node.study_key``), hashed once per study: the audit keeps no key column.

    Studies are never deleted and ids only grow, so each search hashes just the
    studies added since the last one; thread-safe enough for a dict that only grows.
    """

    def __init__(self) -> None:
        self._keys: dict[int, str] = {}
        self._last_id = 0

    def study_ids(self, session: Session, key: str) -> list[int]:
        if not looks_like_key(key):
            return []
        new = session.execute(select(Study.id, Study.study_uid).where(Study.id > self._last_id)).all()
        for study_id, uid in new:
            self._keys[study_id] = study_key(uid)
            self._last_id = max(self._last_id, study_id)
        return [study_id for study_id, known in self._keys.items() if known == key]


def _row(job: Job, study_uid: str) -> JobRow:
    return JobRow(job.id, job.state.value, study_uid, job.created_at, job.updated_at, job.attempts, job.error,
                  Outcome.of(job.result))  # fmt: skip


@dataclass(frozen=True)
class TimelineEntry:
    at: datetime
    kind: str
    subject: str
    actor: str
    message: str


@dataclass(frozen=True)
class JobStory:
    """A job, its study, its images' outcomes, its deliveries and its timeline (oldest first)."""

    row: JobRow
    job: Job
    images: list[tuple[dict[str, Any], Outcome]]
    deliveries: list[Delivery]
    timeline: list[TimelineEntry] = field(default_factory=list)


def job_story(session: Session, job_id: str) -> JobStory | None:
    found = session.execute(
        select(Job, Study.study_uid).join(Study, Job.study_id == Study.id).where(Job.id == job_id)
    ).first()
    if found is None:
        return None
    job, study_uid = found
    instances = session.scalars(
        select(Instance).join(JobImage, JobImage.instance_id == Instance.id).where(JobImage.job_id == job.id)
    ).all()
    images = [(image, image_outcome(image)) for image in (job.result or {}).get("images") or []]
    deliveries = list(session.scalars(select(Delivery).where(Delivery.job_id == job.id).order_by(Delivery.id)))
    return JobStory(_row(job, study_uid), job, images, deliveries, _timeline(session, job, instances))


def _timeline(session: Session, job: Job, instances: Any) -> list[TimelineEntry]:
    """Audit events of the job, its study and its instances, with each instance's arrival."""
    subjects = or_(
        and_(Event.subject_kind == "job", Event.subject_id == job.id),
        and_(Event.subject_kind == "study", Event.subject_id == str(job.study_id)),
        and_(Event.subject_kind == "instance", Event.subject_id.in_([str(i.id) for i in instances])),
    )
    events = session.scalars(select(Event).where(subjects).order_by(Event.at, Event.id).limit(TIMELINE_LIMIT))
    entries = [TimelineEntry(e.at, e.kind, f"{e.subject_kind} {e.subject_id}", e.actor, e.message) for e in events]
    callers = dict(session.execute(
        select(Association.id, Association.calling_ae).where(Association.id.in_([i.association_id for i in instances]))
    ).all())  # fmt: skip
    for instance in instances:
        sender = callers.get(instance.association_id, "?") if instance.association_id else "?"
        entries.append(TimelineEntry(instance.received_at, f"instance.{instance.status.value}",
                                     f"instance {instance.id}", f"C-STORE from {sender}",
                                     f"{instance.modality or '?'} {instance.sop_instance_uid}"))  # fmt: skip
    return sorted(entries, key=lambda entry: _aware(entry.at))


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def recent_failures(session: Session, limit: int = 20) -> list[JobRow]:
    rows = session.execute(
        select(Job, Study.study_uid).join(Study, Job.study_id == Study.id)
        .where(Job.state == JobState.FAILED).order_by(Job.updated_at.desc()).limit(limit)
    ).all()  # fmt: skip
    return [_row(job, study_uid) for job, study_uid in rows]
