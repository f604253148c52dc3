"""The storage SCP against real peers: dcmtk's storescu and pynetdicom, on loopback."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select

from node.audit.models import Association, AssociationOutcome, Instance, InstanceStatus
from node.config import Peer
from node.errors import StoreStatus
from node.scu import FileToSend, send_files
from tests.factories import CT_IMAGE, DX_FOR_PRESENTATION, dataset_body, make_image, write, write_study
from tests.node.raw_dimse import context_ids, encode_body, send_raw_store
from tests.peers import require_tool

# pydicom's bundled files, one per transfer syntax family, and the storescu option proposing it
STORESCU_CASES = [
    ("CT_small.dcm", "-xe"),  # explicit VR little endian
    ("MR_small_implicit.dcm", "-xi"),  # implicit VR little endian
    ("image_dfl.dcm", "-xd"),  # deflated explicit VR little endian
    ("SC_rgb_jpeg_dcmtk.dcm", "-xy"),  # JPEG baseline
    ("JPEG-lossy.dcm", "-xx"),  # JPEG extended (12 bit)
    ("SC_rgb_jpeg_gdcm.dcm", "-xs"),  # JPEG lossless SV1
    ("MR_small_jp2klossless.dcm", "-xv"),  # JPEG 2000 lossless
    ("JPEG2000.dcm", "-xw"),  # JPEG 2000
    ("MR_small_RLE.dcm", "-xr"),  # RLE lossless
]


def _testdata(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not bundled with this pydicom")
    return Path(path)


def _storescu(port: int, files: list[Path], *options: str, aet: str = "STORESCU") -> subprocess.CompletedProcess[str]:
    storescu = require_tool("storescu", "dcmtk")
    env = dict(os.environ, TCP_NODELAY="1")
    command = [storescu, "-aet", aet, "-aec", "GVRNODE", *options, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)


def _instances(service: Any) -> list[Instance]:
    with service.audit.session() as session:
        return list(session.scalars(select(Instance).order_by(Instance.id)))


@pytest.mark.parametrize(("name", "option"), STORESCU_CASES, ids=[case[0] for case in STORESCU_CASES])
def test_scp_storescu_transfer_syntax_spooled_byte_identical(running_node: Any, name: str, option: str) -> None:
    """Each transfer syntax lands in the spool exactly as sent, with a matching audit row."""
    service = running_node()
    path = _testdata(name)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    result = _storescu(service.port, [path], option, "-R")
    assert result.returncode == 0, f"{name}: {result.stderr}"
    rows = _instances(service)
    assert [(row.sop_instance_uid, row.status) for row in rows] == [(ds.SOPInstanceUID, InstanceStatus.ACCEPTED)]
    row = rows[0]
    assert row.transfer_syntax == ds.file_meta.TransferSyntaxUID
    spooled = Path(row.spool_path)
    assert _elements(spooled) == _elements(path), "stored data set differs from the one sent"
    assert row.sha256 == hashlib.sha256(spooled.read_bytes()).hexdigest()
    assert row.size_bytes == spooled.stat().st_size


def _elements(path: Path) -> dict[Any, Any]:
    """Element values as sent on the wire: dcmtk drops trailing padding and group lengths.

    Pixel data is compared as raw (still encoded) bytes, so any transcoding would show.
    """
    ds = pydicom.dcmread(path)
    return {element.tag: element.value for element in ds if element.tag.element != 0 and element.tag != 0xFFFCFFFC}


def test_scp_storescu_study_folder_all_stored(running_node: Any, tmp_path: Path) -> None:
    """A 10-image study in one storescu association: ten files, ten rows, one study."""
    service = running_node()
    study_uid, paths = write_study(tmp_path / "study", 10)
    result = _storescu(service.port, paths)
    assert result.returncode == 0, result.stderr
    rows = _instances(service)
    assert len(rows) == 10 and {row.study_uid for row in rows} == {study_uid}
    for row in rows:
        assert dataset_body(Path(row.spool_path)) == dataset_body(Path(paths[0]).parent / f"{row.sop_instance_uid}.dcm")


def _wait_rows(service: Any, model: Any, count: int, timeout: float = 5.0) -> list[Any]:
    """Notification handlers run after the peer got its answer: poll briefly."""
    deadline = time.monotonic() + timeout
    while True:
        with service.audit.session() as session:
            rows = list(session.scalars(select(model)))
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_scp_unknown_calling_ae_rejected_and_audited(running_node: Any) -> None:
    """A caller missing from allowed_calling_aets is rejected at association, with a reason."""
    service = running_node()
    result = _storescu(service.port, [_testdata("CT_small.dcm")], aet="INTRUDER")
    assert result.returncode != 0
    rows = _wait_rows(service, Association, 1)
    assert [row.outcome for row in rows] == [AssociationOutcome.REJECTED]
    assert "INTRUDER" in (rows[0].reason or "")
    assert _instances(service) == []


def test_scp_truncated_dataset_fails_and_node_keeps_serving(running_node: Any, tmp_path: Path) -> None:
    """A cut-off data set gets 0xC000 and an audit row; the next good one is stored."""
    service = running_node()
    good = write(make_image(generate_uid()), tmp_path / "good")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[:-700])
    other = write(make_image(generate_uid(), seed=3), tmp_path / "other")
    files = [FileToSend.read(p) for p in (truncated, other)]
    results = send_files(files, Peer(ae_title="GVRNODE", host="127.0.0.1", port=service.port), "GVRSCU")
    assert [r.status for r in results] == [StoreStatus.CANNOT_UNDERSTAND, StoreStatus.SUCCESS]
    rows = _instances(service)
    assert [row.status for row in rows] == [InstanceStatus.REJECTED, InstanceStatus.ACCEPTED]
    assert "truncated" in (rows[0].reason or "") or "pixel data holds" in (rows[0].reason or "")
    assert rows[0].dimse_status == StoreStatus.CANNOT_UNDERSTAND
    assert not any(Path(service.spool.incoming).rglob(f"{files[0].sop_instance_uid}*"))


def test_scp_corrupt_element_length_rejected_with_status(running_node: Any, tmp_path: Path) -> None:
    """A data set whose element lengths run past its end gets a failure status, not a crash."""
    service = running_node()
    good = write(make_image(generate_uid()), tmp_path / "g")
    raw = bytearray(good.read_bytes())
    at = raw.index(b"\x10\x00\x20\x00LO")  # PatientID: its 2-byte length becomes absurd
    raw[at + 6 : at + 8] = (0xFFF0).to_bytes(2, "little")
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(bytes(raw))
    item = FileToSend(broken, *_uids(good))
    results = send_files([item], Peer(ae_title="GVRNODE", host="127.0.0.1", port=service.port), "GVRSCU")
    assert results[0].status == StoreStatus.CANNOT_UNDERSTAND
    assert [row.status for row in _instances(service)] == [InstanceStatus.REJECTED]


def _uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID)


def test_scp_duplicate_instance_stored_once_and_audited(running_node: Any, tmp_path: Path) -> None:
    """Sending the same SOP instance twice keeps the first copy and audits the second."""
    service = running_node()
    _, paths = write_study(tmp_path / "s", 1)
    peer = Peer(ae_title="GVRNODE", host="127.0.0.1", port=service.port)
    for _ in range(2):
        assert send_files([FileToSend.read(paths[0])], peer, "GVRSCU")[0].ok
    rows = _instances(service)
    assert [row.status for row in rows] == [InstanceStatus.ACCEPTED, InstanceStatus.DUPLICATE]
    assert rows[0].spool_path == rows[1].spool_path
    assert len(list(service.spool.incoming.rglob("*.dcm"))) == 1


def test_scp_concurrent_associations_all_stored(running_node: Any, tmp_path: Path) -> None:
    """Four associations at once: every acknowledged instance has its file and its row."""
    import concurrent.futures

    service = running_node()
    peer = Peer(ae_title="GVRNODE", host="127.0.0.1", port=service.port)
    batches = [write_study(tmp_path / f"s{i}", 5)[1] for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: send_files([FileToSend.read(p) for p in b], peer, "GVRSCU"), batches))
    assert all(r.ok for batch in results for r in batch)
    rows = _instances(service)
    assert len(rows) == 20 and all(row.status == InstanceStatus.ACCEPTED for row in rows)
    sent = {p.stem: p for batch in batches for p in batch}
    for row in rows:  # pynetdicom streams files as they are: byte for byte identical
        assert dataset_body(Path(row.spool_path)) == dataset_body(sent[row.sop_instance_uid])


def test_scp_echo_answers(running_node: Any) -> None:
    """C-ECHO from an allowed caller succeeds (gvr echo's path)."""
    from node.scu import echo

    service = running_node()
    assert echo(Peer(ae_title="GVRNODE", host="127.0.0.1", port=service.port), "GVRSCU") == 0


def test_scp_wrong_called_ae_rejected(running_node: Any) -> None:
    """An association addressed to another AE title is rejected."""
    from node.scu import PeerUnreachableError, echo

    service = running_node()
    with pytest.raises(PeerUnreachableError):
        echo(Peer(ae_title="SOMEONEELSE", host="127.0.0.1", port=service.port), "GVRSCU")
    rows = _wait_rows(service, Association, 1)
    assert [row.outcome for row in rows] == [AssociationOutcome.REJECTED]


# -- issue 9: requests pynetdicom itself would not send -----------------------------------


CLASS_MISMATCHES = [  # (the request's SOP class, the status, what the audit reason says)
    (DX_FOR_PRESENTATION, StoreStatus.SOP_CLASS_NOT_SUPPORTED, "context negotiated for '1.2.840.10008.5.1.4.1.1.2'"),
    (CT_IMAGE, StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, "differs from the request's"),
]


@pytest.mark.parametrize(("request_class", "status", "reason"), CLASS_MISMATCHES, ids=["dx-request", "ct-request"])
def test_scp_store_on_context_for_other_class_refused(
    raw_association: Any, request_class: str, status: StoreStatus, reason: str
) -> None:
    """A DX instance on the context negotiated for CT is refused and audited, never stored: 0x0122 when the
    request names DX, 0xA900 when it names CT (the data set then contradicts it)."""
    service, assoc = raw_association
    ds = make_image(generate_uid())  # DX for presentation
    answer = send_raw_store(assoc, encode_body(ds), request_class, ds.SOPInstanceUID, context_ids(assoc)[CT_IMAGE])
    assert answer.status == status
    [row] = _instances(service)
    assert (row.status, row.dimse_status) == (InstanceStatus.REJECTED, status)
    assert reason in (row.reason or "")
    assert not list(service.spool.incoming.rglob("*.dcm"))


@pytest.mark.parametrize(
    ("field", "value"),
    [("instance", ""), ("class", ""), ("instance", "1.2.3\r\n2030-01-01 00:00:00,000 INFO gvr.node: FORGED")],
    ids=["empty-instance", "empty-class", "crlf-instance"],
)
def test_scp_store_with_bad_request_uid_answered_at_once(raw_association: Any, field: str, value: str) -> None:
    """An empty or invalid Affected SOP Instance/Class UID gets 0xC000 at once (no network timeout), an audit
    row with the value escaped, and the association goes on: the next good instance is stored."""
    service, assoc = raw_association
    ds = make_image(generate_uid())
    sop_class, sop_instance = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
    if field == "instance":
        sop_instance = value
    else:
        sop_class = value
    cx = context_ids(assoc)[DX_FOR_PRESENTATION]
    answer = send_raw_store(assoc, encode_body(ds), sop_class, sop_instance, cx, wait=5)
    assert answer.status == StoreStatus.CANNOT_UNDERSTAND
    assert answer.seconds < 2, "answered at once, not after a timeout"
    assert assoc.is_established
    good = make_image(generate_uid(), seed=1)
    assert send_raw_store(assoc, encode_body(good), DX_FOR_PRESENTATION, good.SOPInstanceUID, cx).status == 0
    rejected, accepted = _wait_rows(service, Instance, 2)
    assert (rejected.status, rejected.dimse_status) == (InstanceStatus.REJECTED, StoreStatus.CANNOT_UNDERSTAND)
    assert rejected.sop_instance_uid is None or rejected.sop_instance_uid == ds.SOPInstanceUID
    assert "\n" not in (rejected.reason or "") and "\r" not in (rejected.reason or "")
    assert accepted.status == InstanceStatus.ACCEPTED
