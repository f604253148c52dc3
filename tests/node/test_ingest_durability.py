"""The durability order of a received instance (issue 12): named early, acknowledged only once durable.

``PendingWrite.publish_then_flush`` links the written bytes to their final name before
their fsync ends and flushes file and folder together. The guarantee stays: an ACCEPTED
row (and the success the sender gets) means the file at its spool path is complete and
durable. A flush that fails leaves no row and no final file; a final-named file without
its row (a crash in that window, maybe partial) is replaced when the instance comes again.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from node.audit.db import AuditDB
from node.audit.migrate import upgrade
from node.audit.models import Instance, InstanceStatus
from node.errors import StoreStatus
from node.ingest import Ingestor, StoreRequest
from node.spool import Spool
from tests.factories import make_image

_real_fsync = os.fsync


def _failing_fsync(kind: Callable[[int], bool]) -> Callable[[int], None]:
    """``os.fsync`` that fails with EIO for descriptors of one kind (a regular file, a folder)."""

    def fsync(fd: int) -> None:
        if kind(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "injected fsync failure")
        _real_fsync(fd)

    return fsync


@pytest.fixture
def ingestor(tmp_path: Path) -> Ingestor:
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    upgrade(url)
    return Ingestor(Spool(tmp_path / "spool", owner="node"), AuditDB(url), "test")


def _request() -> tuple[StoreRequest, pydicom.Dataset]:
    ds = make_image(generate_uid(), seed=3)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return StoreRequest(buffer.getvalue(), str(ds.SOPClassUID), str(ds.SOPInstanceUID), None), ds


def _rows(ingestor: Ingestor, sop_uid: str) -> list[tuple[InstanceStatus, str | None, str | None]]:
    with ingestor.audit.session() as session:
        rows = session.execute(select(Instance.status, Instance.sha256, Instance.spool_path).where(
            Instance.sop_instance_uid == sop_uid)).all()  # fmt: skip
    return [(row.status, row.sha256, row.spool_path) for row in rows]


@pytest.mark.parametrize("kind", [stat.S_ISREG, stat.S_ISDIR], ids=["data-fsync", "folder-fsync"])
def test_failed_flush_refuses_and_leaves_no_row_and_no_file(
    ingestor: Ingestor, monkeypatch: pytest.MonkeyPatch, kind: Callable[[int], bool]
) -> None:
    """The file's (or its folder's) fsync fails after the early link: 0xA700, the name is gone, no ACCEPTED row."""
    request, ds = _request()
    final = ingestor.spool.instance_path(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
    ingestor.spool._ensure_folder(final.parent)  # the study folder exists: only the instance's own fsyncs fail
    monkeypatch.setattr(os, "fsync", _failing_fsync(kind))

    assert ingestor.receive(request).status == StoreStatus.OUT_OF_RESOURCES
    assert not final.exists()
    assert [status for status, _, _ in _rows(ingestor, request.sop_instance_uid)] == [InstanceStatus.REJECTED]
    ingestor.spool._writer.shutdown(wait=True)  # the helper's fsync has ended: its temporary file is gone too
    assert list(ingestor.spool.tmp.iterdir()) == []


def test_failed_flush_then_sent_again_is_kept(ingestor: Ingestor, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a refused flush the sender's retry is accepted like a first copy."""
    request, _ = _request()
    monkeypatch.setattr(os, "fsync", _failing_fsync(stat.S_ISREG))
    assert ingestor.receive(request).status == StoreStatus.OUT_OF_RESOURCES
    monkeypatch.setattr(os, "fsync", _real_fsync)

    assert ingestor.receive(request).status == StoreStatus.SUCCESS
    accepted = [row for row in _rows(ingestor, request.sop_instance_uid) if row[0] == InstanceStatus.ACCEPTED]
    assert len(accepted) == 1
    _, sha256, spool_path = accepted[0]
    assert Path(spool_path or "").read_bytes() == request.data and sha256 == hashlib.sha256(request.data).hexdigest()


@pytest.mark.parametrize(
    "leftover",
    [lambda data: b"", lambda data: data[: len(data) // 2], lambda data: b"\0" * len(data)],
    ids=["empty", "half", "zeros"],  # what a crash before the data fsync can leave under the final name
)
def test_crash_leftover_without_row_is_replaced_on_next_receipt(
    ingestor: Ingestor, leftover: Callable[[bytes], bytes]
) -> None:
    """A final-named file without its row (a crash between link and commit) is not taken as received."""
    request, ds = _request()
    final = ingestor.spool.instance_path(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
    final.parent.mkdir(parents=True)
    final.write_bytes(leftover(request.data))

    assert ingestor.receive(request).status == StoreStatus.SUCCESS
    assert final.read_bytes() == request.data
    assert _rows(ingestor, request.sop_instance_uid) == [
        (InstanceStatus.ACCEPTED, hashlib.sha256(request.data).hexdigest(), str(final))
    ]


def test_publish_then_flush_names_only_durable_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spool level: a failed data fsync removes the early name; a taken name is kept, never replaced."""
    spool = Spool(tmp_path / "spool", owner="test")
    final = spool.instance_path("1.2.3", "1.2.3.4")
    with spool.begin(b"kept") as pending:
        assert pending.publish_then_flush(final).created
    other = spool.instance_path("1.2.3", "1.2.3.5")
    monkeypatch.setattr(os, "fsync", _failing_fsync(stat.S_ISREG))
    with pytest.raises(OSError, match="injected"), spool.begin(b"lost") as pending:
        pending.publish_then_flush(other)
    assert not other.exists()
    monkeypatch.setattr(os, "fsync", _real_fsync)
    with spool.begin(b"second copy") as pending:
        again = pending.publish_then_flush(final)
    assert not again.created and final.read_bytes() == b"kept"
    assert again.sha256 == hashlib.sha256(b"second copy").hexdigest()
    spool._writer.shutdown(wait=True)
    assert list(spool.tmp.iterdir()) == []


def test_publish_names_nothing_when_the_data_fsync_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``publish`` (``Spool.store``: quarantine, outbox) names only fsynced bytes; a failed fsync names nothing."""
    spool = Spool(tmp_path / "spool", owner="test")
    final = spool.instance_path("1.2.3", "1.2.3.4")
    monkeypatch.setattr(os, "fsync", _failing_fsync(stat.S_ISREG))
    with pytest.raises(OSError, match="injected"):
        spool.store(b"lost", final)
    assert not final.exists() and list(spool.tmp.iterdir()) == []


def test_failed_flush_leaves_a_name_another_writer_replaced(ingestor: Ingestor, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second node process on the spool replaced the early-linked name before our fsync failed: its file stays."""
    request, ds = _request()
    final = ingestor.spool.instance_path(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
    ingestor.spool._ensure_folder(final.parent)
    theirs = b"the other writer's whole copy"

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode) and final.exists() and final.read_bytes() != theirs:
            other = final.with_suffix(".other")
            other.write_bytes(theirs)
            os.replace(other, final)  # what the other process's leftover replacement does
            raise OSError(errno.EIO, "injected fsync failure")
        _real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert ingestor.receive(request).status == StoreStatus.OUT_OF_RESOURCES
    assert final.read_bytes() == theirs


def test_row_committed_first_by_another_writer_is_a_refusal_not_an_error(
    ingestor: Ingestor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process commits this instance's row (same path) between our check and our commit: 0xA700, no raise."""
    request, ds = _request()
    final = ingestor.spool.instance_path(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
    commit = ingestor.accepted_rows.commit

    def other_process_first(row: dict[str, object]) -> None:
        with ingestor.audit.session() as session:
            session.add(Instance(**{**row, "association_id": None}))
        commit(row)  # now breaks the unique SOP instance UID

    monkeypatch.setattr(ingestor.accepted_rows, "commit", other_process_first)
    assert ingestor.receive(request).status == StoreStatus.OUT_OF_RESOURCES
    rows = _rows(ingestor, request.sop_instance_uid)
    assert [(status, path) for status, _, path in rows] == [(InstanceStatus.ACCEPTED, str(final))]
    assert final.exists()  # the other writer's row names it: never removed by the refused copy
