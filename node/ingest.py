"""Receive one instance: check it, spool it durably, audit it, then (only then) say success.

The storage SCP calls ``Ingestor.receive`` from each association's thread; the
returned status goes back to the peer unchanged.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

from pydicom.uid import UID
from sqlalchemy import Connection, bindparam, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from node.audit.db import AuditDB, add_event
from node.audit.group_commit import GroupCommit, GroupCommitInterruptedError
from node.audit.models import Instance, InstanceStatus, Study, StudyState, utcnow
from node.duplicates import KeptCopy, SopInstanceLocks, conflict_reason, quarantine_path
from node.errors import InstanceRejectedError, StoreStatus
from node.inspect_instance import InstanceHeader, read_header
from node.limits import ResourceLimits
from node.spool import PendingWrite, Spool, SpooledFile, SpoolFullError
from node.study_key import study_key
from node.supervision import describe_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreRequest:
    """What the peer sent: the raw data set, the C-STORE request's identifiers and its context's SOP class.

    Values come from the peer as they are (tolerant when we read): ``Ingestor.receive``
    checks them before relying on them.
    """

    data: bytes
    sop_class_uid: str
    sop_instance_uid: str
    association_id: int | None
    context_sop_class: str | None = None  # the abstract syntax negotiated for the presentation context


@dataclass(frozen=True)
class IngestResult:
    """The status to answer, and the study the instance belongs to when it was kept."""

    status: StoreStatus
    study_uid: str | None = None


class Ingestor:
    """Spool + audit for received instances; holds no per-instance state."""

    def __init__(
        self,
        spool: Spool,
        audit: AuditDB,
        actor: str,
        limits: ResourceLimits | None = None,
        locks: SopInstanceLocks | None = None,
    ) -> None:
        self.spool = spool
        self.audit = audit
        self.actor = actor
        self.limits = limits or ResourceLimits()
        self.locks = locks or SopInstanceLocks()  # issue 12: across processes with scp_processes > 1
        # issue 12: instances arriving on concurrent associations share one audit transaction
        self.accepted_rows = GroupCommit(audit, write_accepted_rows)

    def receive(self, request: StoreRequest) -> IngestResult:
        """Store and audit one instance. Never raises: every failure becomes a status."""
        try:
            check_request(request)
            with self.spool.begin(request.data) as pending:  # issue 12: on disk while the header is checked
                header = read_header(request.data, request.sop_class_uid, request.sop_instance_uid, self.limits)
                status = self._store(request, header, pending)
        except InstanceRejectedError as rejected:
            return self._refuse(request, rejected.status, rejected.reason)
        except SpoolFullError as error:
            return self._refuse(request, StoreStatus.OUT_OF_RESOURCES, f"spool full: {error.strerror}")
        except OSError as error:
            return self._refuse(request, StoreStatus.OUT_OF_RESOURCES, f"spool write failed: {error}")
        return IngestResult(status, header.study_uid if status == StoreStatus.SUCCESS else None)

    def refuse(self, request: StoreRequest, status: StoreStatus, reason: str) -> IngestResult:
        """Audit an instance refused before it was whole (``node.message_cap``): the same REJECTED row."""
        return self._refuse(request, status, reason)

    def _refuse(self, request: StoreRequest, status: StoreStatus, reason: str) -> IngestResult:
        self._audit_rejection(request, status, reason)
        return IngestResult(status)

    def _store(self, request: StoreRequest, header: InstanceHeader, pending: PendingWrite) -> StoreStatus:
        with self.locks.hold(header.sop_instance_uid):  # issue 9: link and commit one copy at a time
            final = self.spool.instance_path(header.study_uid, header.sop_instance_uid)
            # issue 12: named once written, file and folder flushed together; the row commits only after both, and
            # nothing trusts a spool file without its ACCEPTED row, so a crash leftover is replaced below next time
            spooled = pending.publish_then_flush(final)
            # the common path needs no SELECT: link-if-absent already said whether the file is new
            if not spooled.created:
                kept = self._kept_copy(header.sop_instance_uid)
                if kept is not None:
                    return self._record_copy(request, header, spooled, kept)
                # a file without its audit row and no writer in flight (we hold the lock): a crash left it
                spooled = self.spool.store(request.data, final, replace=True)
            try:  # returns once the row (and its study's) is committed, maybe beside other associations' rows
                self.accepted_rows.commit(_instance_values(request, header, spooled, InstanceStatus.ACCEPTED))
            except IntegrityError as error:  # accepted already: in another study, or by another node process
                kept = self._kept_copy(header.sop_instance_uid)
                if kept is None or kept.spool_path == str(final):
                    # another writer's row names this very file (or the conflict is not the instance's):
                    # nothing of ours is durable and audited, so the sender must try again
                    log.error("audit write failed, instance refused (0xA700): %s", describe_error(error))
                    return StoreStatus.OUT_OF_RESOURCES
                final.unlink(missing_ok=True)  # this copy goes to quarantine, never beside the kept one
                return self._record_copy(request, header, spooled, kept)
            except (SQLAlchemyError, GroupCommitInterruptedError) as error:
                final.unlink(missing_ok=True)  # no audit row, so no acknowledged file
                log.error("audit write failed, instance refused (0xA700): %s", error)
                return StoreStatus.OUT_OF_RESOURCES
        _log_notes(header)
        return StoreStatus.SUCCESS

    def _kept_copy(self, sop_instance_uid: str) -> KeptCopy | None:
        with self.audit.session() as session:
            row = session.execute(
                select(Instance.id, Instance.sha256, Instance.spool_path, Instance.study_uid).where(
                    Instance.sop_instance_uid == sop_instance_uid,
                    Instance.status == InstanceStatus.ACCEPTED,
                )
            ).first()
        return None if row is None else KeptCopy(row.id, row.sha256 or "", row.spool_path or "", row.study_uid or "")

    def _record_copy(
        self, request: StoreRequest, header: InstanceHeader, copy: SpooledFile, kept: KeptCopy
    ) -> StoreStatus:
        """A second copy: a duplicate when its bytes and study are the kept one's, else a conflict.

        Both are answered success: the copy is durable (the kept file, or quarantine) and audited.
        """
        values = _instance_values(request, header, copy, InstanceStatus.DUPLICATE)
        values["spool_path"] = kept.spool_path
        values["reason"] = _with_notes("SOP instance already stored with the same content; first copy kept", header)
        conflict = copy.sha256 != kept.sha256 or header.study_uid != kept.study_uid
        if conflict:
            quarantined = self.spool.store(request.data, quarantine_path(self.spool.root, header.sop_instance_uid,
                                                                         copy.sha256))  # fmt: skip
            values.update(status=InstanceStatus.CONFLICT, spool_path=str(quarantined.path),
                          reason=_with_notes(conflict_reason(header.sop_instance_uid, header.study_uid, copy.sha256,
                                                             kept, quarantined.path), header))  # fmt: skip
        try:
            with self.audit.session() as session:
                row = Instance(**values)
                session.add(row)
                session.flush()
                if conflict:
                    log.warning("instance row %s conflicts with row %s: copy quarantined", row.id, kept.instance_id)
                    add_event(session, "instance.conflict", ("instance", row.id), self.actor, str(values["reason"]), {
                        "kept_instance_id": kept.instance_id, "kept_sha256": kept.sha256, "kept_path": kept.spool_path,
                        "kept_study_uid": kept.study_uid, "conflict_sha256": copy.sha256,
                        "conflict_study_uid": header.study_uid, "quarantine_path": values["spool_path"],
                        "why_kept": "first acknowledged copy",
                    })  # fmt: skip
        except SQLAlchemyError as error:
            log.error("audit write failed for a second copy, refused (0xA700): %s", error)
            return StoreStatus.OUT_OF_RESOURCES
        return StoreStatus.SUCCESS

    def _audit_rejection(self, request: StoreRequest, status: StoreStatus, reason: str) -> None:
        log.warning("instance refused with %s (0x%04X): %s", status.name, status, reason)
        row = Instance(
            association_id=request.association_id,
            status=InstanceStatus.REJECTED,
            dimse_status=int(status),
            reason=reason,
            sop_instance_uid=_uid_or_none(request.sop_instance_uid),
            sop_class_uid=_uid_or_none(request.sop_class_uid),
            size_bytes=len(request.data),
            sha256=hashlib.sha256(request.data).hexdigest(),
        )
        try:
            with self.audit.session() as session:
                session.add(row)
                add_event(session, "instance.rejected", ("association", request.association_id), self.actor, reason)
        except SQLAlchemyError as error:
            log.error("audit write failed while refusing an instance: %s", error)


def check_request(request: StoreRequest) -> None:
    """The C-STORE request names a valid SOP instance and class, the class its context was negotiated for.

    issue 9: pynetdicom leaves a request with an empty AffectedSOPInstanceUID unanswered,
    and serves a C-STORE whatever context it arrives on.
    """
    for name, value in (("AffectedSOPInstanceUID", request.sop_instance_uid),
                        ("AffectedSOPClassUID", request.sop_class_uid)):  # fmt: skip
        if not _uid_or_none(value):
            what = "empty" if not value else f"{value[:80]!r}, not a valid UID"
            raise InstanceRejectedError(StoreStatus.CANNOT_UNDERSTAND, f"the C-STORE request's {name} is {what}")
    if request.context_sop_class is not None and request.context_sop_class != request.sop_class_uid:
        raise InstanceRejectedError(
            StoreStatus.SOP_CLASS_NOT_SUPPORTED,
            f"C-STORE of SOP class {request.sop_class_uid} on a presentation context negotiated for "
            f"{request.context_sop_class[:80]!r}: send each instance on a context for its own class",
        )


def _log_notes(header: InstanceHeader) -> None:
    """An instance kept despite what its encoding gets wrong: visible to an operator, never a failure."""
    for note in header.notes:
        log.warning("instance of study %s accepted with a note: %s", study_key(header.study_uid), note)


def _with_notes(reason: str, header: InstanceHeader) -> str:
    return "; ".join((reason, *header.notes))


def _uid_or_none(value: str) -> str | None:
    """``value`` when it is a valid UID (what an audit column may hold), else None."""
    return value if value and UID(value).is_valid else None


def _instance_values(
    request: StoreRequest, header: InstanceHeader, spooled: SpooledFile, status: InstanceStatus
) -> dict[str, object]:
    """The ``instances`` row as Core insert parameters (cheaper than an ORM object per instance)."""
    return {
        "association_id": request.association_id,
        "status": status,
        "dimse_status": int(StoreStatus.SUCCESS),
        "reason": "; ".join(header.notes) or None,  # an ACCEPTED row's reason: what was read despite PS3.5
        "sop_instance_uid": header.sop_instance_uid,
        "sop_class_uid": header.sop_class_uid,
        "series_uid": header.series_uid,
        "study_uid": header.study_uid,
        "transfer_syntax": header.transfer_syntax,
        "modality": header.modality,
        "size_bytes": spooled.size_bytes,
        "sha256": spooled.sha256,
        "spool_path": str(spooled.path),
        "received_at": utcnow(),
    }


def _study_upsert(dialect_insert: Any) -> Any:
    """Create the study or mark it receiving again: one statement, safe under concurrency."""
    statement = dialect_insert(Study).values(
        study_uid=bindparam("study_uid"),
        state=bindparam("state"),
        first_received_at=bindparam("now"),
        last_received_at=bindparam("now"),
    )
    return statement.on_conflict_do_update(
        index_elements=[Study.study_uid],
        set_={"last_received_at": statement.excluded.last_received_at, "state": statement.excluded.state},
    )


# Built once: constructing a statement (and its cache key) per instance cost ~0.2 ms of CPU.
_INSERT_INSTANCE = insert(Instance)
_STUDY_UPSERT = {"postgresql": _study_upsert(postgresql.insert), "sqlite": _study_upsert(sqlite.insert)}


def write_accepted_rows(connection: Connection, rows: list[dict[str, object]]) -> None:
    """One group's ACCEPTED instance rows in one statement, and each of their studies marked receiving once."""
    connection.execute(_INSERT_INSTANCE, rows)
    statement = _STUDY_UPSERT["postgresql" if connection.dialect.name == "postgresql" else "sqlite"]
    now = utcnow()
    for study_uid in sorted({str(row["study_uid"]) for row in rows}):  # sorted: one lock order across writers
        connection.execute(statement, {"study_uid": study_uid, "state": StudyState.RECEIVING, "now": now})
