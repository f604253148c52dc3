"""SQLAlchemy 2 models of the audit database (SQLite and PostgreSQL).

Enums are stored by value as plain strings, so a row reads the same in ``psql``,
``sqlite3`` and ``gvr audit``. Every schema change gets an Alembic revision.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, BigInteger, DateTime, Enum, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _enum(kind: type[enum.Enum]) -> Enum:
    return Enum(
        kind,
        values_callable=lambda members: [m.value for m in members],
        native_enum=False,
        validate_strings=True,
        length=32,
    )


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}


class AssociationOutcome(enum.StrEnum):
    OPEN = "open"
    REJECTED = "rejected"
    RELEASED = "released"
    ABORTED = "aborted"


class InstanceStatus(enum.StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"
    CONFLICT = "conflict"  # issue 9: same SOP Instance UID, other content or study; that copy is quarantined


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"
    ASSEMBLED = "assembled"
    NO_ELIGIBLE = "no_eligible"


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    INFERRED = "INFERRED"
    SENT = "SENT"
    FAILED = "FAILED"


class DeliveryStatus(enum.StrEnum):
    SENT = "sent"
    FAILED = "failed"


class Association(Base):
    """One DICOM association a peer opened with the SCP (accepted or not)."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    called_ae: Mapped[str] = mapped_column(String(16))
    peer_ip: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None]
    outcome: Mapped[AssociationOutcome] = mapped_column(_enum(AssociationOutcome))
    reason: Mapped[str | None] = mapped_column(Text)
    tls: Mapped[bool] = mapped_column(default=False)

    instances: Mapped[list[Instance]] = relationship(back_populates="association")


class Study(Base):
    """A study as the node assembles it: one row per StudyInstanceUID."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[StudyState] = mapped_column(_enum(StudyState), default=StudyState.RECEIVING)
    first_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow)
    assembled_at: Mapped[datetime | None]
    reason: Mapped[str | None] = mapped_column(Text)

    jobs: Mapped[list[Job]] = relationship(back_populates="study")


class Instance(Base):
    """One C-STORE request: what came, from whom, where it lies, and the answer given."""

    __tablename__ = "instances"
    __table_args__ = (
        # A SOP instance is stored once; duplicates and rejections get rows of their own.
        Index(
            "uq_instances_accepted_sop",
            "sop_instance_uid",
            unique=True,
            sqlite_where=text("status = 'accepted'"),
            postgresql_where=text("status = 'accepted'"),
        ),
        Index("ix_instances_study_uid", "study_uid"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    status: Mapped[InstanceStatus] = mapped_column(_enum(InstanceStatus))
    dimse_status: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    series_uid: Mapped[str | None] = mapped_column(String(64))
    study_uid: Mapped[str | None] = mapped_column(String(64))
    transfer_syntax: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str | None] = mapped_column(String(64))
    spool_path: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)

    association: Mapped[Association | None] = relationship(back_populates="instances")


class Job(Base):
    """One inference job: a study's eligible images through predict, explain, deliver."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state", "state"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    state: Mapped[JobState] = mapped_column(_enum(JobState), default=JobState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    enqueued_at: Mapped[datetime | None]  # None: committed but not yet on the broker
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    worker: Mapped[str | None] = mapped_column(String(255))
    device: Mapped[str | None] = mapped_column(String(32))
    model_version: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None]
    # issue 10: the audit DB drives recovery (node.reconciler). The current phase (analysis while
    # QUEUED/RUNNING, delivery while INFERRED) is due again at next_attempt_at (a scheduled retry),
    # is held by ``worker`` until lease_expires_at (renewed by its heartbeat), was retried
    # ``retries`` times and re-published ``republished`` times; both counts restart with each phase.
    next_attempt_at: Mapped[datetime | None]
    lease_expires_at: Mapped[datetime | None]
    retries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    republished: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    follows_job_id: Mapped[str | None] = mapped_column(String(36))  # an earlier job of the same study

    study: Mapped[Study] = relationship(back_populates="jobs")
    images: Mapped[list[JobImage]] = relationship(back_populates="job", order_by="JobImage.id")


class JobImage(Base):
    """An instance selected for a job (a study may hold images the node must not analyse)."""

    __tablename__ = "job_images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"))

    job: Mapped[Job] = relationship(back_populates="images")
    instance: Mapped[Instance] = relationship()


class Delivery(Base):
    """One attempt to C-STORE one result object to one destination."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(128))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    status: Mapped[DeliveryStatus] = mapped_column(_enum(DeliveryStatus))
    dimse_status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(default=utcnow)


class Event(Base):
    """Append-only trail: every state transition with time, actor and reason."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_subject", "subject_kind", "subject_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(64))
    subject_kind: Mapped[str] = mapped_column(String(32))
    subject_id: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(255))
    message: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any] | None]
