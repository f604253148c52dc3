"""What ``gvr audit`` shows: recent associations, studies, jobs and events, as rows and tables.

Queries return plain dicts (column -> value) so one result feeds both the
aligned text tables and the JSON output. The audit DB holds no patient names;
event ``details`` are free-form, so keys that mention a patient are dropped
before anything is shown.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from node.audit.models import Association, Event, Instance, InstanceStatus, Job, Study
from node.audit.outcome import job_outcome
from node.log_hygiene import escape_controls
from node.study_key import study_key

ASSOCIATION_COLUMNS = ("id", "started_at", "ended_at", "calling_ae", "called_ae", "peer", "outcome", "tls",
                       "instances", "reason")  # fmt: skip
# The tables show what a person scans for; --json carries every field.
STUDY_COLUMNS = ("id", "study_key", "study_uid", "state", "last_received_at", "assembled_at", "accepted", "duplicate",
                 "rejected", "reason")  # fmt: skip
JOB_COLUMNS = ("id", "study_key", "study_uid", "state", "finding", "probability", "ood", "attempts", "worker",
               "updated_at", "error")  # fmt: skip
EVENT_COLUMNS = ("id", "at", "kind", "subject", "actor", "message")
_PHI_KEY = re.compile("patient", re.IGNORECASE)


class UnknownJobError(LookupError):
    """``--job`` named a job the audit database does not hold."""


@dataclass(frozen=True)
class AuditQuery:
    """What to show: the newest ``limit`` rows of each list, optionally one study or one job."""

    limit: int = 20
    study_uid: str | None = None
    job_id: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ValueError(f"invalid limit {self.limit!r}: expected a whole number of rows >= 1")
        for name in ("study_uid", "job_id"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(f"invalid {name} {value!r}: leave it out to show everything")


@dataclass(frozen=True)
class AuditReport:
    """The four lists, newest first; each row a dict holding at least the module's *_COLUMNS."""

    associations: list[dict[str, Any]]
    studies: list[dict[str, Any]]
    jobs: list[dict[str, Any]]
    events: list[dict[str, Any]]

    def as_json(self) -> dict[str, list[dict[str, Any]]]:
        """One JSON-ready object: datetimes as ISO 8601 with the UTC offset."""
        return {
            name: [{key: _json_value(value) for key, value in row.items()} for row in getattr(self, name)]
            for name in ("associations", "studies", "jobs", "events")
        }

    def json_text(self) -> str:
        """``as_json`` as indented JSON text: control characters escaped, DEL too (json leaves it raw)."""
        return json.dumps(self.as_json(), indent=2, ensure_ascii=True).replace("\x7f", "\\u007f")

    def render(self, max_width: int = 48) -> str:
        """Aligned plain-text tables, one per list, times in UTC; free text wrapped at ``max_width``."""
        sections = (
            ("Associations", ASSOCIATION_COLUMNS, self.associations),
            ("Studies", STUDY_COLUMNS, self.studies),
            ("Jobs", JOB_COLUMNS, self.jobs),
            ("Events", EVENT_COLUMNS, self.events),
        )
        parts = [f"{title} ({len(rows)}, newest first, times UTC)\n{render_table(cols, rows, max_width)}"
                 for title, cols, rows in sections]  # fmt: skip
        return "\n\n".join(parts)


def collect(session: Session, query: AuditQuery) -> AuditReport:
    """Run the four queries; raises ``UnknownJobError`` when ``query.job_id`` is not in the DB."""
    study_uid = query.study_uid
    if query.job_id is not None:
        job = session.get(Job, query.job_id)
        if job is None:
            raise UnknownJobError(
                f"no job {query.job_id!r} in the audit database; `gvr audit` lists recent jobs"
            )
        if study_uid is not None and study_uid != job.study.study_uid:
            raise ValueError(f"job {query.job_id!r} belongs to another study than {study_uid!r}")
        study_uid = job.study.study_uid
    return AuditReport(
        associations=_associations(session, query.limit, study_uid),
        studies=_studies(session, query.limit, study_uid),
        jobs=_jobs(session, query.limit, study_uid, query.job_id),
        events=_events(session, query.limit, study_uid, query.job_id),
    )


def _associations(session: Session, limit: int, study_uid: str | None) -> list[dict[str, Any]]:
    counts = (
        select(Instance.association_id, func.count().label("n")).group_by(Instance.association_id).subquery()
    )
    statement = (
        select(Association, func.coalesce(counts.c.n, 0))
        .outerjoin(counts, counts.c.association_id == Association.id)
        .order_by(Association.started_at.desc(), Association.id.desc())
        .limit(limit)
    )
    if study_uid is not None:
        senders = select(Instance.association_id).where(Instance.study_uid == study_uid)
        statement = statement.where(Association.id.in_(senders))
    rows = []
    for association, instances in session.execute(statement):
        rows.append({
            "id": association.id, "started_at": association.started_at, "ended_at": association.ended_at,
            "calling_ae": association.calling_ae, "called_ae": association.called_ae,
            "peer": f"{association.peer_ip}:{association.peer_port}", "outcome": association.outcome.value,
            "tls": association.tls, "instances": int(instances), "reason": association.reason,
        })  # fmt: skip
    return rows


def _studies(session: Session, limit: int, study_uid: str | None) -> list[dict[str, Any]]:
    statement = select(Study).order_by(Study.last_received_at.desc(), Study.id.desc()).limit(limit)
    if study_uid is not None:
        statement = statement.where(Study.study_uid == study_uid)
    studies = list(session.scalars(statement))
    counts = _instance_counts(session, [study.study_uid for study in studies])
    rows = []
    for study in studies:
        by_status = counts.get(study.study_uid, {})
        rows.append({
            "id": study.id, "study_key": study_key(study.study_uid), "study_uid": study.study_uid,
            "state": study.state.value,
            "first_received_at": study.first_received_at, "last_received_at": study.last_received_at,
            "assembled_at": study.assembled_at,
            **{status.value: by_status.get(status.value, 0) for status in InstanceStatus},
            "reason": study.reason,
        })  # fmt: skip
    return rows


def _instance_counts(session: Session, study_uids: Sequence[str]) -> dict[str, dict[str, int]]:
    if not study_uids:
        return {}
    statement = (
        select(Instance.study_uid, Instance.status, func.count())
        .where(Instance.study_uid.in_(study_uids))
        .group_by(Instance.study_uid, Instance.status)
    )
    counts: dict[str, dict[str, int]] = {}
    for uid, status, count in session.execute(statement):
        if uid is None:
            continue
        counts.setdefault(uid, {})[InstanceStatus(status).value] = int(count)
    return counts


def _jobs(session: Session, limit: int, study_uid: str | None, job_id: str | None) -> list[dict[str, Any]]:
    statement = (
        select(Job, Study.study_uid)
        .join(Study, Job.study_id == Study.id)
        .order_by(Job.created_at.desc(), Job.id)
        .limit(limit)
    )
    if study_uid is not None:
        statement = statement.where(Study.study_uid == study_uid)
    if job_id is not None:
        statement = statement.where(Job.id == job_id)
    rows = []
    for job, uid in session.execute(statement):
        rows.append({
            "id": job.id, "study_key": study_key(uid), "study_uid": uid, "state": job.state.value,
            "attempts": job.attempts,
            "worker": job.worker, "device": job.device, "model_version": job.model_version,
            "created_at": job.created_at, "updated_at": job.updated_at, "started_at": job.started_at,
            "finished_at": job.finished_at, "error": job.error, **job_outcome(job.result),
        })  # fmt: skip
    return rows


def _events(session: Session, limit: int, study_uid: str | None, job_id: str | None) -> list[dict[str, Any]]:
    statement = select(Event).order_by(Event.at.desc(), Event.id.desc()).limit(limit)
    if study_uid is not None:
        statement = statement.where(_event_scope(session, study_uid, job_id))
    rows = []
    for event in session.scalars(statement):
        rows.append({
            "id": event.id, "at": event.at, "kind": event.kind,
            "subject": f"{event.subject_kind}:{event.subject_id}", "actor": event.actor,
            "message": event.message, "subject_kind": event.subject_kind, "subject_id": event.subject_id,
            "details": _without_phi(event.details),
        })  # fmt: skip
    return rows


def _event_scope(session: Session, study_uid: str, job_id: str | None) -> Any:
    """Events about the study (by UID or row id) and its jobs; with a job, that job only."""
    study = session.scalar(select(Study).where(Study.study_uid == study_uid))
    study_ids = [study_uid] + ([str(study.id)] if study is not None else [])
    if job_id is not None:
        job_ids = [job_id]
    else:
        job_ids = list(session.scalars(select(Job.id).join(Study).where(Study.study_uid == study_uid)))
    return or_(
        (Event.subject_kind == "study") & Event.subject_id.in_(study_ids),
        (Event.subject_kind == "job") & Event.subject_id.in_(job_ids),
    )


def _without_phi(value: Any) -> Any:
    """Drop dict keys that mention a patient, at any depth (details are free-form)."""
    if isinstance(value, dict):
        return {k: _without_phi(v) for k, v in value.items() if not _PHI_KEY.search(str(k))}
    if isinstance(value, list):
        return [_without_phi(v) for v in value]
    return value


def _as_utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; every time the node writes is UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _json_value(value: Any) -> Any:
    return _as_utc(value).isoformat() if isinstance(value, datetime) else value


def _cell(value: Any, max_width: int) -> list[str]:
    """The cell's lines: free text wrapped at ``max_width`` (nothing is cut), one line otherwise."""
    if value is None:
        text = "-"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, datetime):
        text = _as_utc(value).strftime("%Y-%m-%d %H:%M:%S")
    elif isinstance(value, float):
        text = f"{value:.3f}"
    else:  # peer strings (AE titles, reasons quoting header values) never drive the terminal
        text = escape_controls(" ".join(str(value).split()))
    if len(text) <= max_width or " " not in text:  # identifiers (UIDs) stay whole
        return [text]
    return textwrap.wrap(text, max_width, break_long_words=False, break_on_hyphens=False)


def render_table(columns: Sequence[str], rows: Sequence[dict[str, Any]], max_width: int = 48) -> str:
    """Left-aligned columns separated by two spaces; long text wraps onto more lines; no rows: '(none)'."""
    if max_width < 4:
        raise ValueError(f"invalid max_width {max_width}: cells need at least 4 characters")
    if not rows:
        return "(none)"
    cells = [[_cell(row.get(column), max_width) for column in columns] for row in rows]
    widths = [max(len(column), *(len(text) for line in cells for text in line[i])) for i, column in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        for depth in range(max(len(cell) for cell in row)):
            parts = [(cell[depth] if depth < len(cell) else "").ljust(w) for cell, w in zip(row, widths, strict=True)]
            lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
