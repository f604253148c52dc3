"""An oversized instance is aborted while it streams, not buffered whole first (issue 9, part 3's gap).

A real ``gvr node`` with ``max_instance_mb`` = 16. dcmtk's storescu sends a 32 MB
instance (2x the limit); a raw sender, on a real association, streams a C-STORE
whose data set never ends, 1 MB PDUs made on the fly up to 8x the limit; a third
announces one 2 GB P-DATA-TF PDU. Each must get an A-ABORT once the limit is
crossed (the streamer having sent little more than the limit), a REJECTED audit
row with 0xC001 naming max_instance_mb and the UIDs of its command set, and the
node's peak resident memory must stay near the limit; an instance just under the
limit is still stored.
"""

from __future__ import annotations

import select as io_select
import socket
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import encode
from sqlalchemy import select

from node.audit.db import AuditDB
from node.audit.models import Association, AssociationOutcome, Instance, InstanceStatus
from node.errors import StoreStatus
from tests.factories import make_image, write
from tests.peers import LOOPBACK, free_port
from tests.peers_dcmtk import dcmtk_tool
from tests.reliability.harness import (
    CALLING_AE,
    FIGURES,
    ManagedProcess,
    base_env,
    connect_raw,
    send_paths,
    start_node,
    wait_until,
)
from tests.reliability.test_resource_bombs import peak_rss_mb

LIMIT_MB = 16
MB = 2**20
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
PDU_BYTES = MB
A_ABORT = 0x07
CONTEXT_ID = 1


@dataclass
class Rig:
    node: ManagedProcess
    port: int
    audit: AuditDB


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    root = tmp_path_factory.mktemp("message-cap")
    port = free_port()
    env = base_env(data_dir=str(root / "data"), port=str(port), allowed_calling_aets=f"{CALLING_AE},STORESCU",
                   min_free_disk_mb="0", max_instance_mb=str(LIMIT_MB))  # fmt: skip
    node = start_node(env, root / "gvr-node-message-cap.log")
    audit = AuditDB(f"sqlite:///{root / 'data' / 'audit.sqlite3'}")
    try:
        yield Rig(node, port, audit)
    finally:
        node.stop()
        audit.dispose()


def _image_of(megabytes: float, folder: Path) -> tuple[str, Path]:
    """A CR of about ``megabytes`` of 16-bit pixels (noise, so nothing compresses it on the way)."""
    side = int((megabytes * MB / 2) ** 0.5)
    ds = make_image(generate_uid(), size=8)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CR_STORAGE
    ds.Modality = "CR"
    ds.Rows = ds.Columns = side
    ds.PixelData = np.random.default_rng(side).integers(0, 4096, (side, side), dtype=np.uint16).tobytes()
    return str(ds.SOPInstanceUID), write(ds, folder)


def _rows(audit: AuditDB, sop_instance_uid: str) -> list[Instance]:
    with audit.session() as session:
        return list(session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)))


def _assert_aborted_and_audited(rig: Rig, sop_instance_uid: str, read_mb: int = LIMIT_MB) -> None:
    """One REJECTED row (0xC001, max_instance_mb, the node read ``read_mb`` MB of the message), association ABORTED."""
    rows = _rows(rig.audit, sop_instance_uid)
    assert [row.status for row in rows] == [InstanceStatus.REJECTED], rows
    row = rows[0]
    assert row.dimse_status == StoreStatus.EXCEEDS_RESOURCE_LIMIT and row.sop_class_uid == CR_STORAGE
    assert "max_instance_mb" in (row.reason or "") and f"({read_mb}.0 MB in," in (row.reason or ""), (
        row.reason
    )

    def outcome() -> AssociationOutcome | None:
        with rig.audit.session() as session:
            return session.scalar(select(Association.outcome).where(Association.id == row.association_id))

    wait_until(lambda: outcome() == AssociationOutcome.ABORTED, 10, "the association's ABORTED row")


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _raw_association(port: int) -> tuple[socket.socket, int]:
    """An association for CR (Explicit VR Little Endian) negotiated by hand on a plain socket; its context ID.

    By hand because the test must read what the node answers on the same socket it streams on.
    """
    context = _item(0x20, bytes([CONTEXT_ID, 0, 0, 0]) + _item(0x30, CR_STORAGE.encode())
                    + _item(0x40, ExplicitVRLittleEndian.encode()))  # fmt: skip
    items = _item(0x10, b"1.2.840.10008.3.1.1.1") + context + _item(0x50, _item(0x51, struct.pack(">L", 0)))
    body = struct.pack(">HH", 1, 0) + b"GVRNODE".ljust(16) + CALLING_AE.encode().ljust(16) + bytes(32) + items
    sock = connect_raw(port, timeout=10)
    sock.sendall(struct.pack(">BBL", 0x01, 0, len(body)) + body)
    header = sock.recv(6, socket.MSG_WAITALL)
    assert header[:1] == b"\x02", f"not an A-ASSOCIATE-AC: {header!r}"
    answer = sock.recv(struct.unpack(">L", header[2:])[0], socket.MSG_WAITALL)
    offset, results = 68, {}  # after the fixed fields: items (type, reserved, 2-byte length)
    while offset + 4 <= len(answer):
        kind, _, length = struct.unpack_from(">BBH", answer, offset)
        if kind == 0x21:  # presentation context (AC): ID, reserved, result
            results[answer[offset + 4]] = answer[offset + 6]
        offset += 4 + length
    assert results.get(CONTEXT_ID) == 0, f"CR context not accepted: {results}"
    return sock, CONTEXT_ID


def _command(sop_instance_uid: str) -> bytes:
    """A C-STORE-RQ command set with a data set to follow (Implicit VR Little Endian, group length first)."""
    command = Dataset()
    command.AffectedSOPClassUID = CR_STORAGE
    command.CommandField, command.MessageID, command.Priority = 0x0001, 1, 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = sop_instance_uid
    body = encode(command, True, True)
    assert body is not None
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


def _p_data(context_id: int, control: int, fragment: bytes) -> bytes:
    pdv = struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


def _answer(sock: socket.socket) -> bytes:
    """What the node sent back before it closed (an A-ABORT PDU is 10 bytes)."""
    sock.settimeout(10)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except OSError:
        pass
    return data


def test_storescu_instance_twice_the_limit_is_aborted(rig: Rig, tmp_path: Path) -> None:
    """dcmtk's storescu sends 32 MB with max_instance_mb 16: A-ABORT, a REJECTED row, the node stays small."""
    assert list(send_paths(rig.port, [write(make_image(generate_uid()), tmp_path)]).statuses.values()) == [0]
    before = peak_rss_mb(rig.node.pid)
    uid, path = _image_of(2 * LIMIT_MB, tmp_path)
    done = subprocess.run([dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "GVRNODE", LOOPBACK, str(rig.port),
                           str(path)], capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode != 0 and "abort" in done.stderr.lower(), done.stderr[-1000:]
    _assert_aborted_and_audited(rig, uid)
    growth = peak_rss_mb(rig.node.pid) - before
    FIGURES.notes.append(
        f"storescu 32 MB instance, max_instance_mb 16: aborted, node peak RSS +{growth:.0f} MiB"
    )
    assert growth < 2 * LIMIT_MB, f"node peak RSS grew {growth:.0f} MiB"


def test_endless_stream_is_aborted_at_the_limit(rig: Rig) -> None:
    """A data set streamed in 1 MB PDUs up to 8x the limit: cut off after about the limit."""
    before = peak_rss_mb(rig.node.pid)
    raw, context_id = _raw_association(rig.port)
    uid = generate_uid()
    sent = 0
    with raw:
        raw.sendall(_p_data(context_id, 0x03, _command(uid)))
        fragment = bytes(PDU_BYTES - 12)
        try:
            while (
                sent < 8 * LIMIT_MB * MB and not io_select.select([raw], [], [], 0)[0]
            ):  # a sender reads as it sends
                raw.sendall(_p_data(context_id, 0x00, fragment))
                sent += PDU_BYTES
        except OSError:
            pass  # reset by the node after its A-ABORT
        answer = _answer(raw)
    assert answer[:1] == bytes([A_ABORT]), answer[:16]
    # the node read the limit (the audit row says so); the rest sat in the two kernels' socket buffers
    assert sent < 2 * LIMIT_MB * MB, f"{sent / MB:.0f} MB sent before the node closed"
    _assert_aborted_and_audited(rig, uid)
    growth = peak_rss_mb(rig.node.pid) - before
    FIGURES.notes.append(f"endless C-STORE stream cut after {sent / MB:.0f} MB (limit {LIMIT_MB}), "
                         f"node peak RSS +{growth:.0f} MiB")  # fmt: skip
    assert growth < 2 * LIMIT_MB, f"node peak RSS grew {growth:.0f} MiB"


def test_one_huge_pdu_is_refused_from_its_header(rig: Rig) -> None:
    """A P-DATA-TF PDU announcing 2 GB: refused before one byte of its body is read."""
    raw, context_id = _raw_association(rig.port)
    uid = generate_uid()
    with raw:
        raw.sendall(_p_data(context_id, 0x03, _command(uid)))
        raw.sendall(struct.pack(">BBL", 0x04, 0, 2**31) + struct.pack(">LBB", 2**31 - 4, context_id, 0x00))
        answer = _answer(raw)
    assert answer[:1] == bytes([A_ABORT]), answer[:16]
    _assert_aborted_and_audited(rig, uid, read_mb=0)
    FIGURES.bad_inputs_tried += 3
    FIGURES.bad_inputs_refused += 3


def test_instances_under_the_limit_still_stored(rig: Rig, tmp_path: Path) -> None:
    """15, 6 and 6 MB in one association with max_instance_mb 16: all stored; the cap counts per message."""
    sent = dict(_image_of(megabytes, tmp_path) for megabytes in (LIMIT_MB - 1, 6, 6))
    assert send_paths(rig.port, list(sent.values())).statuses == dict.fromkeys(sent, 0)
    for uid in sent:
        assert [row.status for row in _rows(rig.audit, uid)] == [InstanceStatus.ACCEPTED]
    assert rig.node.alive()
