"""Group commit of audit rows (issue 12): concurrent instances share a transaction, none is answered early.

The writer is gated so the first group stays open until every other caller has queued:
the test then knows that a group of several exists, and checks what each caller saw.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import Connection, create_engine, select, text
from sqlalchemy.exc import OperationalError

from node.audit.db import AuditDB
from node.audit.group_commit import GroupCommit
from node.audit.migrate import upgrade
from node.audit.models import Instance, InstanceStatus
from node.errors import StoreStatus
from node.ingest import Ingestor, StoreRequest, write_accepted_rows
from node.spool import Spool
from tests.factories import make_image

CALLERS = 8


class GatedWriter:
    """A batch writer whose first call (the first caller, alone) waits until the others are queued behind it.

    With ``fail``, every batch of more than one item raises it after writing: a commit that fails.
    """

    def __init__(self, write: Any, fail: Exception | None = None) -> None:
        self.write, self.fail = write, fail
        self.group: GroupCommit[Any] | None = None
        self.batches: list[int] = []

    def __call__(self, connection: Connection, items: list[Any]) -> None:
        if not self.batches and self.group is not None:
            _wait_until(lambda: self.group is not None and self.group.queued() >= CALLERS - 1)
        self.batches.append(len(items))
        self.write(connection, items)
        if self.fail is not None and len(items) > 1:
            raise self.fail


def _wait_until(condition: Any, timeout: float = 3.0) -> None:
    """Polls (a test helper): a caller whose SOP lock stripe is taken may never queue, so no failure on timeout."""
    pause = threading.Event()
    for _ in range(int(timeout / 0.005)):
        if condition():
            return
        pause.wait(0.005)


def _gated_group(audit: AuditDB, writer: GatedWriter) -> GroupCommit[Any]:
    writer.group = GroupCommit(audit, writer)
    return writer.group


def _in_parallel(count: int, work: Any) -> list[Any]:
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        try:
            results[index] = work(index)
        except Exception as error:  # noqa: BLE001 - the test inspects it
            results[index] = error

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


@pytest.fixture
def numbers_db(tmp_path: Path) -> AuditDB:
    audit = AuditDB(f"sqlite:///{tmp_path / 'numbers.sqlite3'}")
    with audit.transaction() as connection:
        connection.execute(text("create table numbers (value integer primary key)"))
    return audit


def _insert_numbers(connection: Connection, values: list[int]) -> None:
    connection.execute(text("insert into numbers (value) values (:value)"), [{"value": v} for v in values])


def _committed(audit: AuditDB, value: int) -> bool:
    """Seen from a connection of its own: only committed rows are visible there."""
    engine = create_engine(audit.url)
    try:
        with engine.connect() as connection:
            return connection.execute(text("select 1 from numbers where value = :v"), {"v": value}).first() is not None
    finally:
        engine.dispose()


def test_group_commit_concurrent_callers_share_a_commit_each_returns_after_its_row(numbers_db: AuditDB) -> None:
    """Eight callers at once: fewer commits than callers, and each returns only once its own row is committed."""
    writer = GatedWriter(_insert_numbers)
    group = _gated_group(numbers_db, writer)

    def call(value: int) -> bool:
        group.commit(value)
        return _committed(numbers_db, value)  # what an acknowledgement may rely on

    assert _in_parallel(CALLERS, call) == [True] * CALLERS
    assert sum(writer.batches) == CALLERS and len(writer.batches) < CALLERS and max(writer.batches) > 1


def test_group_commit_integrity_error_fails_only_its_caller(numbers_db: AuditDB) -> None:
    """One item breaks a unique constraint: the group is retried item by item, the others are committed."""
    with numbers_db.transaction() as connection:
        _insert_numbers(connection, [3])
    group = _gated_group(numbers_db, GatedWriter(_insert_numbers))
    results = _in_parallel(CALLERS, group.commit)
    assert type(results[3]).__name__ == "IntegrityError"
    assert all(result is None for index, result in enumerate(results) if index != 3)
    assert all(_committed(numbers_db, value) for value in range(CALLERS))


def test_group_commit_failure_fails_every_caller_and_commits_nothing(numbers_db: AuditDB) -> None:
    """A group whose commit fails (e.g. the disk): every caller gets the error, no row of the group remains."""
    failure = OperationalError("commit", {}, Exception("disk I/O error"))
    group = _gated_group(numbers_db, GatedWriter(_insert_numbers, fail=failure))
    results = _in_parallel(CALLERS, group.commit)
    grouped = [value for value in range(CALLERS) if results[value] is failure]
    assert len(grouped) > 1 and all(result is None or result is failure for result in results)
    for value in range(CALLERS):
        assert _committed(numbers_db, value) == (results[value] is None)


def _encoded(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_ingest_failed_group_commit_refuses_every_instance_and_keeps_no_file(tmp_path: Path) -> None:
    """Instances of a failed group are all answered 0xA700, with no spool file left; sent again, all are kept."""
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    upgrade(url)
    ingestor = Ingestor(Spool(tmp_path / "spool"), AuditDB(url), "test")
    failure = OperationalError("commit", {}, Exception("disk I/O error"))
    writer = GatedWriter(write_accepted_rows, fail=failure)
    ingestor.accepted_rows = _gated_group(ingestor.audit, writer)
    study = generate_uid()
    requests = []
    for seed in range(CALLERS):
        ds = make_image(study, seed=seed)
        requests.append(StoreRequest(_encoded(ds), str(ds.SOPClassUID), str(ds.SOPInstanceUID), None))

    results = _in_parallel(CALLERS, lambda index: ingestor.receive(requests[index]).status)
    assert StoreStatus.OUT_OF_RESOURCES in results
    assert set(results) <= {StoreStatus.SUCCESS, StoreStatus.OUT_OF_RESOURCES}
    files = {path.stem for path in (tmp_path / "spool" / "incoming").rglob("*.dcm")}
    with ingestor.audit.session() as session:
        accepted = set(session.scalars(select(Instance.sop_instance_uid).where(
            Instance.status == InstanceStatus.ACCEPTED)))  # fmt: skip
    succeeded = {r.sop_instance_uid for r, s in zip(requests, results, strict=True) if s == StoreStatus.SUCCESS}
    assert files == accepted == succeeded  # acknowledged = stored = audited, nothing half-kept

    writer.fail = None
    again = _in_parallel(CALLERS, lambda index: ingestor.receive(requests[index]).status)
    assert again == [StoreStatus.SUCCESS] * CALLERS
    assert len(list((tmp_path / "spool" / "incoming").rglob("*.dcm"))) == CALLERS
