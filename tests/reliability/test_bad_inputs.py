"""The bad-input corpus against a real ``gvr node``, while a good sender keeps sending beside it.

Each data set of ``corpus.build_corpus()`` goes in its own association; each
malformed PDU is written raw to a socket; one peer connects and says nothing.
Every one must end in a failure status (with a REJECTED instance row in the
audit DB) or a clean abort by the node, and the good sender's every instance
must be acknowledged throughout. Kinds the node does not handle yet are strict
xfails naming the gap, so fixing the node turns them into failures to remove.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pynetdicom import AE
from sqlalchemy import select

from node.audit.db import AuditDB
from node.audit.models import Association, Event, Instance, InstanceStatus, Study, StudyState
from tests.factories import DX_FOR_PRESENTATION, write
from tests.peers import LOOPBACK, free_port
from tests.reliability.corpus import BadInstance, build_corpus
from tests.reliability.harness import (
    CALLING_AE,
    FIGURES,
    ManagedProcess,
    base_env,
    connect_raw,
    phi_image,
    send_paths,
    start_node,
    wait_until,
)

NETWORK_TIMEOUT = 3.0
ACSE_TIMEOUT = 2.0
_SUCCESS, _OUT_OF_RESOURCES = 0x0000, 0xA700

KNOWN_GAPS: dict[str, str] = {}  # every kind is handled; add a strict xfail naming a new gap here


@pytest.fixture(scope="module", autouse=True)
def send_files_as_they_are() -> Iterator[None]:
    """pynetdicom sends a file's bytes after its meta unread only in chunked mode (else it decodes them)."""
    import pynetdicom._config

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
        yield


@dataclass
class BadNode:
    process: ManagedProcess
    port: int
    audit: AuditDB


@pytest.fixture(scope="module")
def bad_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BadNode]:
    """One ``gvr node`` for the module, with short ACSE/network timeouts (a silent peer is cut off quickly)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    port = free_port()
    env = base_env(data_dir=str(root / "data"), port=str(port), allowed_calling_aets=CALLING_AE,
                   network_timeout=str(NETWORK_TIMEOUT), acse_timeout=str(ACSE_TIMEOUT), dimse_timeout="3",
                   study_stable_seconds="1", assembler_poll_seconds="0.2", min_free_disk_mb="0")  # fmt: skip
    process = start_node(env, root / "gvr-node-bad-inputs.log")
    audit = AuditDB(f"sqlite:///{root / 'data' / 'audit.sqlite3'}")
    try:
        yield BadNode(process, port, audit)
    finally:
        process.stop()
        audit.dispose()


@dataclass
class GoodSender:
    """Sends good instances, 5 per association, until stopped; every answer recorded."""

    port: int
    folder: Path
    statuses: list[int | None] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        batch = 0
        while not self.stop.is_set():
            paths = [write(phi_image(seed=batch * 5 + i), self.folder / str(batch)) for i in range(5)]
            log = send_paths(self.port, paths)
            self.statuses += list(log.statuses.values())
            if log.error:
                self.errors.append(log.error)
            batch += 1
            self.stop.wait(0.2)


@pytest.fixture(scope="module", autouse=True)
def good_sender(bad_node: BadNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GoodSender]:
    sender = GoodSender(bad_node.port, tmp_path_factory.mktemp("good-sender"))
    thread = threading.Thread(target=sender.run, name="good-sender", daemon=True)
    thread.start()
    yield sender
    sender.stop.set()
    thread.join(30)


def _case(bad: BadInstance) -> object:
    marks = [pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[bad.kind])] if bad.kind in KNOWN_GAPS else []
    return pytest.param(bad, id=bad.kind, marks=marks)


def _send_bad(port: int, path: Path, bad: BadInstance) -> tuple[int | None, str | None]:
    """One association offering the bad file's context (and plain DX, so it always establishes)."""
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(bad.sop_class, bad.transfer_syntax)
    ae.add_requested_context(DX_FOR_PRESENTATION, "1.2.840.10008.1.2.1")
    assoc = ae.associate(LOOPBACK, port, ae_title="GVRNODE")
    assert assoc.is_established
    try:
        response = assoc.send_c_store(path)
    except ValueError as error:  # no accepted presentation context for it
        return None, str(error)
    finally:
        if assoc.is_established:
            assoc.release()
    return (int(response.Status) if "Status" in response else None), None


def _instance_rows(audit: AuditDB, sop_instance_uid: str) -> list[Instance]:
    with audit.session() as session:
        return list(session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)))


@pytest.mark.parametrize("bad", [_case(bad) for bad in build_corpus()])
def test_bad_instance_refused_and_audited(bad: BadInstance, bad_node: BadNode, tmp_path: Path) -> None:
    """A failure status and a REJECTED row; no context; or stored and not analysed, with an event."""
    FIGURES.bad_inputs_tried += 1
    status, no_context = _send_bad(bad_node.port, bad.write(tmp_path), bad)
    if bad.expect == "no_context":
        assert status is None and no_context is not None and "presentation context" in no_context
    elif bad.expect == "not_analysed":
        assert status == _SUCCESS
        study_uid = _instance_rows(bad_node.audit, bad.sop_instance)[0].study_uid

        def no_eligible() -> bool:
            with bad_node.audit.session() as session:
                study = session.scalar(select(Study).where(Study.study_uid == study_uid))
                events = session.scalars(select(Event.kind).where(Event.subject_kind == "study")).all()
            return study is not None and study.state == StudyState.NO_ELIGIBLE and "study.no_eligible" in events

        wait_until(no_eligible, 15, "the non-chest study to be marked no_eligible")
    else:
        assert status is not None and status != _SUCCESS and status != _OUT_OF_RESOURCES, f"status {status}"
        rows = _instance_rows(bad_node.audit, bad.sop_instance)
        assert [row.status for row in rows] == [InstanceStatus.REJECTED] and rows[0].reason
        assert rows[0].dimse_status == status
    FIGURES.bad_inputs_refused += 1


def _associate_rq(called: bytes = b"GVRNODE", items: bytes = b"") -> bytes:
    body = struct.pack(">HH", 1, 0) + called.ljust(16) + CALLING_AE.encode().ljust(16) + b"\x00" * 32 + items
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


RAW_PDUS = {
    "unknown_pdu_type": struct.pack(">BBI", 0x99, 0, 6) + b"\x00" * 6,
    "p_data_before_association": struct.pack(">BBI", 0x04, 0, 12) + struct.pack(">IB", 8, 1) + b"\x03" + b"\x00" * 6,
    "release_before_association": struct.pack(">BBI", 0x05, 0, 4) + b"\x00" * 4,
    "associate_rq_garbage_items": _associate_rq(items=b"\x10\x00\xff\xff" + bytes(range(64))),
    "associate_rq_bad_protocol": struct.pack(">BBI", 0x01, 0, 68) + struct.pack(">HH", 0xBEEF, 0) + b"A" * 64,
    "associate_rq_huge_length": struct.pack(">BBI", 0x01, 0, 0xFFFFFFF0) + b"\x00" * 40,
    "associate_rq_cut_short": _associate_rq()[:30],
}


def _closed_by_node(sock: socket.socket, within: float) -> tuple[bool, bytes]:
    """Read until the node closes the connection (EOF or reset) or ``within`` seconds pass."""
    received = b""
    deadline = time.monotonic() + within
    sock.settimeout(0.5)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, received
        if not chunk:
            return True, received
        received += chunk
    return False, received


@pytest.mark.parametrize("kind", sorted(RAW_PDUS))
def test_malformed_pdu_connection_closed_by_node(kind: str, bad_node: BadNode) -> None:
    """Garbage written raw to the socket: the node aborts or drops the connection, within its timeouts."""
    FIGURES.bad_inputs_tried += 1
    with connect_raw(bad_node.port) as sock:
        sock.sendall(RAW_PDUS[kind])
        closed, answer = _closed_by_node(sock, NETWORK_TIMEOUT + ACSE_TIMEOUT + 5)
    assert closed, f"connection still open after {kind}"
    assert answer[:1] in (b"", b"\x03", b"\x07"), f"answer {answer[:8]!r}"  # nothing, A-ASSOCIATE-RJ or A-ABORT
    assert bad_node.process.alive()
    FIGURES.bad_inputs_refused += 1


def test_silent_peer_timed_out(bad_node: BadNode) -> None:
    """A TCP peer that never sends a byte is cut off after the ACSE timeout, not held forever."""
    FIGURES.bad_inputs_tried += 1
    began = time.monotonic()
    with connect_raw(bad_node.port) as sock:
        closed, _ = _closed_by_node(sock, ACSE_TIMEOUT + NETWORK_TIMEOUT + 5)
    assert closed and time.monotonic() - began >= ACSE_TIMEOUT - 0.5
    FIGURES.bad_inputs_refused += 1


def test_idle_association_aborted_and_audited(bad_node: BadNode) -> None:
    """An association that sends no DIMSE message is ended by the node after the network timeout, audited."""
    FIGURES.bad_inputs_tried += 1
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(DX_FOR_PRESENTATION, "1.2.840.10008.1.2.1")
    assoc = ae.associate(LOOPBACK, bad_node.port, ae_title="GVRNODE")
    assert assoc.is_established
    transport = assoc.dul.socket
    assert transport is not None and transport.socket is not None
    local_port = transport.socket.getsockname()[1]
    wait_until(lambda: not assoc.is_established, NETWORK_TIMEOUT + 10, "the node to end the idle association")

    def audited() -> bool:
        with bad_node.audit.session() as session:
            row = session.scalar(select(Association).where(Association.peer_port == local_port))
        return row is not None and row.ended_at is not None and row.outcome.value in ("aborted", "released")

    wait_until(audited, 10, "the idle association's audit row to be closed")
    FIGURES.bad_inputs_refused += 1


def test_zz_good_sender_served_throughout(good_sender: GoodSender) -> None:
    """Last in the module: the good sender kept going, and every one of its instances was acknowledged."""
    time.sleep(0.5)
    assert len(good_sender.statuses) >= 10, "the good sender barely ran"
    assert good_sender.errors == [] and set(good_sender.statuses) == {_SUCCESS}
    FIGURES.good_instances_during_bad += len(good_sender.statuses)
