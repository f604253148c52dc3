"""pynetdicom's reactor taking a C-STORE response: the cause reproduced, and the gate that prevents it.

"Received unexpected C-STORE service message", then a 30 s DIMSE timeout, was seen
in 3 of 9 fault-free delivery runs. The cause (``node/reactor_gate.py``): after a
C-STORE the association's reactor thread is woken, but until it really runs, its
``_is_paused`` flag still says True; the next ``send_c_store`` trusts it, and the
reactor, once scheduled, takes that request's response off the queue and drops it.

On a loaded host this needs two threads to be scheduled late (measured: 1 in ~1,500
C-STOREs with four busy processes on two cores): the reactor after its wake-up, and
the sending thread before it collects the response. Here both are made certain, at
exactly those points: the reactor runs 30 ms late each time it leaves its checkpoint,
and the sender collects a response 60 ms after asking for it. The peer is dcmtk's
real ``storescp``.
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_context

from node.config import Peer
from node.reactor_gate import ReactorGate, install
from node.scp import set_nodelay
from node.scu import FileToSend, _store_one, associate
from tests.peers import LOOPBACK, free_port, require_tool, start_process, stop_process, wait_for_port

LATE_S = 0.03  # how late the reactor thread runs after each wake-up
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
UNEXPECTED = "Received unexpected C-STORE service message"


class LateWakingEvent(threading.Event):
    """pynetdicom's own checkpoint, with the reactor thread running ``LATE_S`` late after each wake-up."""

    def wait(self, timeout: float | None = None) -> bool:
        woken = super().wait(timeout)
        time.sleep(LATE_S)
        return woken


class LateWakingGate(ReactorGate):
    """The gate, with the same late reactor."""

    def wait(self, timeout: float | None = None) -> bool:
        woken = super().wait(timeout)
        time.sleep(LATE_S)
        return woken


class LateCollectingQueue(queue.Queue[Any]):
    """The DIMSE message queue, with the sending thread collecting a response ``2 * LATE_S`` late."""

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block:
            time.sleep(2 * LATE_S)
        return super().get(block, timeout)


class Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(record.getMessage())


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Peer]:
    """dcmtk's storescp, answering at once (``--ignore``: it stores nothing)."""
    port = free_port()
    log = tmp_path / "storescp.log"
    command = [require_tool("storescp", "dcmtk"), "--ignore", "-aet", "STORESCP", str(port)]
    process: subprocess.Popen[bytes] = start_process(command, log, {**os.environ, "TCP_NODELAY": "1"})
    try:
        wait_for_port(LOOPBACK, port, 20, process=process, log=log)
        yield Peer(ae_title="STORESCP", host=LOOPBACK, port=port)
    finally:
        stop_process(process)


@pytest.fixture
def pynetdicom_warnings() -> Iterator[Messages]:
    handler = Messages()
    logger = logging.getLogger("pynetdicom")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def _objects(folder: Path, count: int) -> list[FileToSend]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for _ in range(count):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientID = SECONDARY_CAPTURE, generate_uid(), "GATE"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(FileToSend(path, SECONDARY_CAPTURE, str(ds.SOPInstanceUID), ExplicitVRLittleEndian))
    return files


def test_stock_checkpoint_late_reactor_takes_a_c_store_response(
    storescp: Peer, pynetdicom_warnings: Messages, tmp_path: Path
) -> None:
    """pynetdicom as shipped: a late reactor takes a response ("unexpected C-STORE"); the send gets none."""
    ae = AE(ae_title="GVRNODE")
    ae.dimse_timeout = 2.0
    ae.add_requested_context(SECONDARY_CAPTURE, ExplicitVRLittleEndian)
    assoc = ae.associate(LOOPBACK, storescp.port, ae_title=storescp.ae_title)
    assert assoc.is_established
    transport = assoc.dul.socket
    assert transport is not None and transport.socket is not None
    set_nodelay(transport.socket)  # as node.scu does: the answer comes within a millisecond or two
    assoc.dimse.msg_queue = LateCollectingQueue()
    assoc._reactor_checkpoint = LateWakingEvent()
    assoc._reactor_checkpoint.set()
    statuses = []
    for item in _objects(tmp_path / "out", 5):
        response = assoc.send_c_store(item.path)
        statuses.append(int(response.Status) if "Status" in response else None)
        if not assoc.is_established:
            break  # the DIMSE timeout aborted the association
    if assoc.is_established:
        assoc.release()
    assert None in statuses, statuses  # a C-STORE whose response never reached send_c_store
    assert any(UNEXPECTED in text for text in pynetdicom_warnings.texts), pynetdicom_warnings.texts


def test_gate_late_reactor_every_c_store_answered(
    storescp: Peer, pynetdicom_warnings: Messages, tmp_path: Path
) -> None:
    """node.scu's associations hold the reactor inside a ReactorGate: 20 C-STOREs, 20 answers, no warning."""
    items = _objects(tmp_path / "out", 20)
    contexts = [build_context(SECONDARY_CAPTURE, [ExplicitVRLittleEndian])]
    began = time.monotonic()
    with associate(storescp, "GVRNODE", contexts, timeout=2.0) as assoc:
        assoc.dimse.msg_queue = LateCollectingQueue()
        install(assoc, LateWakingGate())
        results = [_store_one(assoc, item) for item in items]
    assert [r.status for r in results] == [0] * len(items), [r.error for r in results]
    assert not any(UNEXPECTED in text for text in pynetdicom_warnings.texts), pynetdicom_warnings.texts
    assert time.monotonic() - began < len(items) * LATE_S * 6 + 2.0  # no DIMSE timeout was waited out
