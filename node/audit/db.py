"""Engine, sessions and the event trail of the audit database.

One engine per process, one session per unit of work. SQLite runs in WAL mode
with ``synchronous=FULL``: a committed row survives a power cut, and readers
(``gvr audit``) never block the SCP.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from node.audit.models import Event


class AuditUnavailableError(RuntimeError):
    """The audit database cannot be reached or written; nothing may be acknowledged."""


# Set by `gvr worker` to its Celery node name, so the audit names workers as Flower and `gvr status` do.
WORKER_NODENAME_VARIABLE = "GVR_WORKER_NODENAME"


def actor_name(process: str) -> str:
    """Who did it: host, pid and role, e.g. ``ward-7:4211:scp``.

    In a ``gvr worker`` process: the Celery node name and pid, e.g. ``gpu0@ward-7:4211``.
    """
    node = os.environ.get(WORKER_NODENAME_VARIABLE) if process == "worker" else None
    return f"{node}:{os.getpid()}" if node else f"{socket.gethostname()}:{os.getpid()}:{process}"


def make_engine(url: str) -> Engine:
    """Create the process's engine, with SQLite made durable and concurrent."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=20, max_overflow=10)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


class AuditDB:
    """The audit database of one process: an engine and its session factory."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work: commits on success, rolls back on any error."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A Core connection in one transaction, for hot paths (the SCP's per-instance rows).

        Commits on success, rolls back on any error, like ``session``; skipping the
        ORM's unit of work saves about a millisecond per instance.
        """
        with self.engine.begin() as connection:
            yield connection

    def dispose(self) -> None:
        self.engine.dispose()


def add_event(
    session: Session,
    kind: str,
    subject: tuple[str, object],
    actor: str,
    message: str,
    details: dict[str, Any] | None = None,
) -> Event:
    """Append one event; ``subject`` is (kind, id), e.g. ("job", job.id)."""
    subject_kind, subject_id = subject
    row = Event(
        kind=kind,
        subject_kind=subject_kind,
        subject_id=str(subject_id),
        actor=actor,
        message=message,
        details=details,
    )
    session.add(row)
    return row


@event.listens_for(Event, "before_update")
def _events_are_append_only(*_args: Any) -> None:
    raise RuntimeError("audit events are append-only: an Event row cannot be updated")


@event.listens_for(Event, "before_delete")
def _events_are_never_deleted(*_args: Any) -> None:
    raise RuntimeError("audit events are append-only: an Event row cannot be deleted")
