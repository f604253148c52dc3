"""C-STORE data sets sent as runs of PDUs (node.store_request) are byte for byte what pynetdicom sends."""

from __future__ import annotations

import os
import socket
import threading
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF

from node import scu, store_request
from node.config import Peer
from node.results.build import outbox_path, prepare_outbox
from node.scu import FileToSend, send_files
from node.store_request import (
    RUN_BYTES,
    DataSetReadError,
    DataSetSource,
    encode_pdus,
    encode_runs,
    quiet_sent_events,
)
from tests.factories import DX_FOR_PRESENTATION, make_image, write
from tests.node.test_results import make_fake_job
from tests.peers import LOOPBACK

MAX_PDU_SIZES = [0, 16384, 1001, 7]  # unlimited, the usual default, an odd small one, one byte per fragment
FRAGMENT = 16384 - 6
# a few bytes, one fragment exactly, one more byte, several runs with a short last fragment
DATA_SET_SIZES = [1, 2, 999, FRAGMENT, FRAGMENT + 1, 3 * FRAGMENT - 1, RUN_BYTES + 7, 2 * RUN_BYTES + FRAGMENT * 5 + 3]


def store_rq(data: bytes | None = None, path: tuple[Path, int] | None = None) -> C_STORE:
    primitive = C_STORE()
    primitive.MessageID = 7
    primitive.AffectedSOPClassUID = DX_FOR_PRESENTATION
    primitive.AffectedSOPInstanceUID = "1.2.3.4.5"
    primitive.Priority = 2
    if path is not None:
        primitive._dataset_path = path
    else:
        primitive.DataSet = BytesIO(data or b"")
    return primitive


def pynetdicom_bytes(primitive: C_STORE, context_id: int, max_pdu: int) -> bytes:
    """The message's P-DATA-TF PDUs as pynetdicom encodes and writes them, command set and data set."""
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return b"".join(P_DATA_TF(p_data).encode() for p_data in message.encode_msg(context_id, max_pdu))


def command_bytes(primitive: C_STORE, context_id: int, max_pdu: int) -> bytes:
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    pdus = [p for p in message.encode_msg(context_id, max_pdu) if p.presentation_data_value_list[0][1][0] & 1]
    return b"".join(P_DATA_TF(p_data).encode() for p_data in pdus)


def data_of(size: int) -> bytes:
    return os.urandom(size)


# 7-byte PDUs carry one byte each: the large sizes would be a million PDUs, the small ones cover that limit
SIZES_BY_PDU = [(size, max_pdu) for max_pdu in MAX_PDU_SIZES for size in DATA_SET_SIZES
                if not (max_pdu == 7 and size > 3 * FRAGMENT)]  # fmt: skip


@pytest.mark.parametrize(("size", "max_pdu"), SIZES_BY_PDU)
def test_runs_from_memory_are_pynetdicoms_pdus(size: int, max_pdu: int) -> None:
    data = data_of(size)
    context_id = 5
    source = DataSetSource.of(store_rq(data))
    assert source is not None and source.length == size
    runs = list(encode_runs(source, context_id, max_pdu))
    assert max_pdu == 0 or all(len(run) <= RUN_BYTES + max_pdu for run in runs)  # bounded memory per run
    ours = command_bytes(store_rq(data), context_id, max_pdu) + b"".join(runs)
    assert ours == pynetdicom_bytes(store_rq(data), context_id, max_pdu)


@pytest.mark.parametrize("max_pdu", [0, 16384, 1001])
@pytest.mark.parametrize("size", [1, FRAGMENT + 1, RUN_BYTES + 7])
def test_runs_from_a_file_are_pynetdicoms_pdus(tmp_path: Path, size: int, max_pdu: int) -> None:
    offset = 333  # the data set starts after a preamble and file meta in a real file
    path = tmp_path / "object.dcm"
    path.write_bytes(data_of(offset) + data_of(size))
    source = DataSetSource.of(store_rq(path=(path, offset)))
    assert source is not None and source.length == size
    ours = command_bytes(store_rq(path=(path, offset)), 3, max_pdu) + b"".join(encode_runs(source, 3, max_pdu))
    assert ours == pynetdicom_bytes(store_rq(path=(path, offset)), 3, max_pdu)


@pytest.mark.parametrize("max_pdu", [0, 16384, 1001, 7])
@pytest.mark.parametrize("size", [1, FRAGMENT, FRAGMENT + 1, 3 * FRAGMENT - 1])
def test_pdus_from_a_file_are_pynetdicoms_pdus(tmp_path: Path, size: int, max_pdu: int) -> None:
    """The path for associations whose handlers see each PDU: pynetdicom's P-DATA PDUs, one primitive each."""
    offset = 333
    path = tmp_path / "object.dcm"
    path.write_bytes(data_of(offset) + data_of(size))
    source = DataSetSource.of(store_rq(path=(path, offset)))
    assert source is not None
    pdus = [P_DATA_TF(p_data).encode() for p_data in encode_pdus(source, 3, max_pdu)]
    assert max_pdu == 0 or all(len(pdu) <= 6 + max_pdu for pdu in pdus)
    ours = command_bytes(store_rq(path=(path, offset)), 3, max_pdu) + b"".join(pdus)
    assert ours == pynetdicom_bytes(store_rq(path=(path, offset)), 3, max_pdu)


def test_no_data_set_or_other_messages_take_pynetdicoms_path(tmp_path: Path) -> None:
    assert DataSetSource.of(store_rq(b"")) is None
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"x" * 10)
    assert DataSetSource.of(store_rq(path=(empty, 10))) is None


class Recorder:
    """A TCP proxy in front of an SCP that records every byte the SCU writes, as the SCP reads them."""

    def __init__(self, target_port: int) -> None:
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.target_port = target_port
        self.sent = bytearray()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection((LOOPBACK, self.target_port))
        back = threading.Thread(target=self._pump, args=(server, client, None), daemon=True)
        back.start()
        self._pump(client, server, self.sent)
        back.join(10)
        client.close()
        server.close()
        self.listener.close()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, record: bytearray | None) -> None:
        while data := source.recv(1 << 16):
            if record is not None:
                record += data
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)


@pytest.fixture
def storage_scp() -> Any:
    """A pynetdicom storage SCP with a given maximum PDU length; yields a start(max_pdu) -> (port, received)."""
    servers: list[Any] = []

    def start(max_pdu: int, sop_classes: list[str] | None = None) -> tuple[int, list[bytes]]:
        received: list[bytes] = []

        def on_store(event: Any) -> int:
            received.append(event.request.DataSet.getvalue())
            return 0x0000

        ae = AE(ae_title="RECORDED")
        ae.maximum_pdu_size = max_pdu
        for sop_class in sop_classes or [DX_FOR_PRESENTATION]:
            ae.add_supported_context(sop_class, ExplicitVRLittleEndian)
        server = ae.start_server((LOOPBACK, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        servers.append(server)
        return server.server_address[1], received

    yield start
    for server in servers:
        server.shutdown()


def _send_recorded(files: list[FileToSend], scp_port: int) -> bytes:
    recorder = Recorder(scp_port)
    results = send_files(files, Peer(ae_title="RECORDED", host=LOOPBACK, port=recorder.port), "GVRNODE", timeout=10)
    assert [r.status for r in results] == [0] * len(files)
    recorder.thread.join(10)
    return bytes(recorder.sent)


def _wire_pair(files: list[FileToSend], port: int, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, bytes, int]:
    """(node.scu's stream, pynetdicom's stream, runs ours sent) for the same files to the same SCP."""
    runs: list[int] = []

    def counted_runs(*args: Any) -> Any:
        for run in encode_runs(*args):
            runs.append(len(run))
            yield run

    with monkeypatch.context() as patch:
        patch.setattr(store_request, "encode_runs", counted_runs)
        ours = _send_recorded(files, port)
    with monkeypatch.context() as patch:
        patch.setattr(store_request, "install", lambda assoc: False)  # pynetdicom's providers,
        patch.setattr(scu, "send_file", lambda assoc, path, *_: assoc.send_c_store(path))  # its send_c_store
        theirs = _send_recorded(files, port)
    return ours, theirs, len(runs)


@pytest.mark.parametrize("max_pdu", [0, 16384, 1001])
def test_wire_bytes_identical_to_pynetdicoms(
    tmp_path: Path, storage_scp: Any, monkeypatch: pytest.MonkeyPatch, max_pdu: int
) -> None:
    """The whole stream the SCU writes (association, C-STOREs, release): node.scu's against pynetdicom's own.

    Ours sends each file's data set as it lies on disk (node.store_file), as runs of PDUs;
    pynetdicom's decodes the file, encodes it again and sends one PDU at a time.
    """
    study = generate_uid()
    paths = [write(make_image(study, size=size, seed=size), tmp_path) for size in (16, 90, 800)]
    files = [FileToSend.read(path) for path in paths]
    port, received = storage_scp(max_pdu)
    ours, theirs, runs = _wire_pair(files, port, monkeypatch)
    assert runs >= len(files) + (max_pdu != 0)  # each data set went as runs; limited PDUs: the last as 2+
    assert len(ours) > sum(path.stat().st_size for path in paths) - 3 * 1000
    assert ours == theirs
    expected = [dcmread(path).PixelData for path in paths]
    assert [dcmread(BytesIO(data), force=True).PixelData for data in received[:3]] == expected


def test_sent_events_decide_the_path() -> None:
    ae = AE()
    ae.add_requested_context(DX_FOR_PRESENTATION)
    from pynetdicom.association import Association

    assoc = Association(ae, "requestor")
    assert quiet_sent_events(assoc)  # pynetdicom's own logging handler only
    assoc.bind(evt.EVT_DATA_SENT, lambda event: None)
    assert not quiet_sent_events(assoc)
    other = Association(ae, "requestor")
    other.bind(evt.EVT_PDU_SENT, lambda event: None)
    assert not quiet_sent_events(other)


def test_install_only_on_plain_providers() -> None:
    ae = AE()
    from pynetdicom.association import Association

    assoc = Association(ae, "requestor")
    assert store_request.install(assoc)
    assert type(assoc.dul) is store_request.RunSendingDUL and type(assoc.dimse) is store_request.StoreRequestDIMSE
    assert not store_request.install(assoc)  # already installed: left as it is

    class OtherDIMSE(DIMSEServiceProvider):
        pass

    other = Association(ae, "requestor")
    other.dimse.__class__ = OtherDIMSE
    assert not store_request.install(other)
    assert type(other.dul) is DULServiceProvider


def test_result_objects_wire_bytes_identical(tmp_path: Path, storage_scp: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The delivery's own objects (overlay, side-by-side and cine SC, SR) as pynetdicom would send them."""
    fake = make_fake_job(tmp_path, size=300)
    entries = prepare_outbox(fake.spool, fake.job_id)
    files = [FileToSend(outbox_path(fake.spool, fake.job_id, e), e.sop_class_uid, e.sop_instance_uid,
                        e.transfer_syntax) for e in entries]  # fmt: skip
    assert len(files) == 4
    port, received = storage_scp(16384, [f.sop_class_uid for f in files])
    ours, theirs, runs = _wire_pair(files, port, monkeypatch)
    assert runs >= len(files) and ours == theirs
    assert len(received) == 2 * len(files)


def test_a_failure_mid_data_set_aborts_the_association(
    tmp_path: Path, storage_scp: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The peer holds half a message: the association is aborted, not reused for the next file."""
    path = write(make_image(generate_uid(), size=800), tmp_path)
    port, received = storage_scp(16384)

    def first_run_then_fail(*args: Any) -> Any:
        yield next(encode_runs(*args))
        raise DataSetReadError(path, "it was replaced or changed while it was being sent")

    monkeypatch.setattr(store_request, "encode_runs", first_run_then_fail)
    results = send_files([FileToSend.read(path)] * 2, Peer(ae_title="RECORDED", host=LOOPBACK, port=port), "GVRNODE",
                         timeout=10)  # fmt: skip
    assert [r.status for r in results] == [None, None]  # ours, not the peer's: no PeerUnreachableError
    assert results[0].error is not None and results[0].error.startswith(f"could not read local file {path}")
    assert results[1].error is not None and results[1].error.startswith("not sent: the association was aborted")
    assert received == []
