"""C-STOREs that fail part way: a peer that aborts, an outbox file replaced or unreadable while it is sent.

Each failure is recorded against the right party (the peer, or the local file and its OS error),
every file of the batch gets an answer at once, and a delivery keeps the job retryable.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts, build_context, evt
from pynetdicom.dimse_primitives import C_STORE

from node import store_request
from node.audit.models import DeliveryStatus, JobState
from node.config import Peer, Settings
from node.delivery import RetryPolicy, run_delivery
from node.scu import FileToSend, PeerUnreachableError, SendResult, associate, send_files
from node.store_file import send_file
from node.store_request import DataSetReadError, DataSetSource, encode_pdus, encode_runs
from tests.factories import DX_FOR_PRESENTATION, make_image, write
from tests.node.test_delivery import inferred_job  # noqa: F401 - the fixture
from tests.peers import LOOPBACK

DIMSE_TIMEOUT = Settings.model_fields["dimse_timeout"].default  # what a user gets: 30 s
POLICY = RetryPolicy()  # the delivery worker's default backoff
QUICK_S = 2.5  # a batch that waited for even one DIMSE timeout would take 12 x longer


@pytest.fixture
def scp() -> Iterator[Any]:
    """start(abort_after=None, answer_after=0) -> (peer, received data sets): a pynetdicom storage SCP for every
    storage class, that aborts each association once it has received ``abort_after`` bytes of P-DATA and
    answers each C-STORE ``answer_after`` seconds after the request arrived."""
    servers: list[Any] = []

    def start(abort_after: int | None = None, answer_after: float = 0.0) -> tuple[Peer, list[bytes]]:
        received: list[bytes] = []
        got: dict[int, int] = {}

        def on_data(event: Any) -> None:
            key = id(event.assoc)
            got[key] = got.get(key, 0) + len(event.data)
            if abort_after is not None and got[key] > abort_after and got[key] - len(event.data) <= abort_after:
                event.assoc.abort()

        def on_store(event: Any) -> int:
            received.append(event.request.DataSet.getvalue())
            time.sleep(answer_after)
            return 0x0000

        ae = AE(ae_title="STORESCP")
        ae.maximum_pdu_size = 16384
        ae.supported_contexts = StoragePresentationContexts
        ae.add_supported_context(DX_FOR_PRESENTATION, ExplicitVRLittleEndian)
        handlers = [(evt.EVT_DATA_RECV, on_data), (evt.EVT_C_STORE, on_store)]
        server = ae.start_server((LOOPBACK, 0), block=False, evt_handlers=handlers)
        servers.append(server)
        return Peer(ae_title="STORESCP", host=LOOPBACK, port=server.server_address[1]), received

    yield start
    for server in servers:
        server.shutdown()


def _send(files: list[FileToSend], peer: Peer) -> tuple[list[SendResult], BaseException | None, float]:
    answered: list[SendResult] = []
    started = time.monotonic()
    try:
        send_files(files, peer, "GVRNODE", timeout=DIMSE_TIMEOUT, on_result=lambda item, result: answered.append(result))
    except PeerUnreachableError as error:
        return answered, error, time.monotonic() - started
    return answered, None, time.monotonic() - started


# 1. The peer aborts in the middle of a data set


def test_peer_abort_mid_data_set_ends_the_batch_at_once(tmp_path: Path, scp: Any) -> None:
    """The DUL is dead though pynetdicom still says established: no file is queued into it (was 2 x the timeout)."""
    peer, received = scp(abort_after=300_000)
    path = write(make_image(generate_uid(), size=1000), tmp_path)  # 2 MB: the abort comes mid data set
    answered, error, elapsed = _send([FileToSend.read(path)] * 3, peer)
    assert elapsed < QUICK_S
    assert isinstance(error, PeerUnreachableError) and "dropped the association" in str(error)
    assert len(answered) == 1 and answered[0].status is None and not answered[0].ok
    assert answered[0].error is not None and "association ended" in answered[0].error
    assert received == []


def test_delivery_to_a_peer_that_aborts_records_every_object_failed_and_retries(
    scp: Any, inferred_job: Any  # noqa: F811 - the fixture
) -> None:
    peer, received = scp(abort_after=20_000)
    delivered = inferred_job([peer])
    started = time.monotonic()
    assert run_delivery(delivered.ctx, delivered.job_id, POLICY) == "retry scheduled"
    assert time.monotonic() - started < 2 * QUICK_S
    rows = delivered.deliveries()
    assert len(rows) == 4 and all(row.status == DeliveryStatus.FAILED for row in rows)
    assert all("dropped the association" in row.error or "association ended" in row.error for row in rows)
    assert delivered.state().state == JobState.INFERRED and received == []


def test_a_peer_that_does_not_answer_in_time_is_named_for_the_timeout_not_a_drop(tmp_path: Path, scp: Any) -> None:
    """No C-STORE response within the DIMSE timeout: the error names the timeout and the file, says we aborted."""
    peer, received = scp(answer_after=2.5)
    paths = [write(make_image(generate_uid(), size=64, seed=seed), tmp_path) for seed in (1, 2)]
    answered: list[SendResult] = []
    started = time.monotonic()
    with pytest.raises(PeerUnreachableError) as caught:
        send_files([FileToSend.read(path) for path in paths], peer, "GVRNODE", timeout=1.0,
                   on_result=lambda item, result: answered.append(result))  # fmt: skip
    assert time.monotonic() - started < 1.0 + QUICK_S  # one timeout, then no second file
    assert str(caught.value) == (f"{peer} sent no C-STORE response within 1 s for {paths[0].name} "
                                 "and the association was aborted")  # fmt: skip
    assert [(result.status, result.error) for result in answered] == [
        (None, "no C-STORE response within 1 s; the association was aborted")]
    assert len(received) == 1  # the peer got the first file only


# 2. The file is replaced (or changes) between the start of its C-STORE and its last byte


def _store_rq(path: Path | None = None, offset: int = 0, data: bytes | None = None) -> C_STORE:
    primitive = C_STORE()
    if path is not None:
        primitive._dataset_path = (path, offset)
    if data is not None:
        primitive.DataSet = BytesIO(data)
    return primitive


def _source_then(path: Path, change: Any) -> list[bytearray]:
    path.write_bytes(b"A" * 1000)
    source = DataSetSource.of(_store_rq(path, 128))
    assert source is not None and source.length == 872
    change(path)
    return list(encode_runs(source, 1, 16384))


def _replace_with_longer(path: Path) -> None:
    longer = path.with_suffix(".new")
    longer.write_bytes(b"B" * 5000)
    os.replace(longer, path)  # the outbox rebuilt meanwhile


def _grow_in_place(path: Path) -> None:
    with open(path, "ab") as file:
        file.write(b"C" * 4000)


def _shrink(path: Path) -> None:
    os.truncate(path, 500)


@pytest.mark.parametrize(
    ("change", "reason"),
    [(_replace_with_longer, "replaced or changed"), (_grow_in_place, "replaced or changed"), (_shrink, "ended after")],
)
def test_a_file_that_changes_while_sent_fails_instead_of_going_out_cut_short(
    tmp_path: Path, change: Any, reason: str
) -> None:
    path = tmp_path / "object.dcm"
    with pytest.raises(DataSetReadError, match=f"could not read local file {path}: .*{reason}"):
        _source_then(path, change)


def test_an_unchanged_file_is_sent_whole(tmp_path: Path) -> None:
    runs = _source_then(tmp_path / "object.dcm", lambda path: None)
    assert sum(len(run) - 12 for run in runs) == 872


def test_a_data_set_in_memory_wins_over_a_path_as_in_pynetdicom(tmp_path: Path) -> None:
    path = tmp_path / "object.dcm"
    path.write_bytes(b"A" * 1000)
    source = DataSetSource.of(_store_rq(path, 128, data=b"memory"))
    assert source is not None and source.path is None and source.length == len(b"memory")
    assert DataSetSource.of(_store_rq(path, 128, data=b"")) is None  # pynetdicom sends no data set either


def test_send_file_replaced_mid_send_fails_its_c_store(
    tmp_path: Path, scp: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: the outbox file replaced by a longer one after the first run; nothing is stored."""
    peer, received = scp()
    path = write(make_image(generate_uid(), size=1000), tmp_path)
    item = FileToSend.read(path)

    def replace_after_first_run(source: DataSetSource, *args: Any) -> Any:
        runs = encode_runs(source, *args)
        yield next(runs)
        replacement = tmp_path / "replacement.dcm"
        replacement.write_bytes(path.read_bytes() + b"\0" * 4000)
        os.replace(replacement, path)
        yield from runs

    monkeypatch.setattr(store_request, "encode_runs", replace_after_first_run)
    answered, error, _ = _send([item], peer)
    assert error is None and len(answered) == 1 and answered[0].status is None
    assert answered[0].error == f"could not read local file {path}: it was replaced or changed while it was being sent"
    assert received == []



def _replace_with_a_longer_copy(path: Path) -> None:
    replacement = path.with_name("replacement.dcm")
    replacement.write_bytes(path.read_bytes() + b"\0" * 4000)
    os.replace(replacement, path)


@pytest.mark.parametrize("when", ["before its data set", "after its first data PDU"])
def test_on_an_association_with_sent_handlers_a_replaced_file_fails_alike(
    tmp_path: Path, scp: Any, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """An EVT_DATA_SENT handler (pynetdicom's PDU-by-PDU path): the file replaced before its data set is read
    or after its first PDU was read fails its C-STORE with the runs path's error; aborted, nothing stored."""
    peer, received = scp()
    path = write(make_image(generate_uid(), size=1000), tmp_path)
    item = FileToSend.read(path)
    data_pdus: list[int] = []

    def on_data_sent(event: Any) -> None:
        if event.data[:1] == b"\x04" and event.data[11] & 1 == 0:  # a P-DATA-TF of the data set
            data_pdus.append(len(event.data))

    def on_dimse_sent(event: Any) -> None:  # the request is encoded; its data set not yet read
        if when == "before its data set":
            _replace_with_a_longer_copy(path)

    def replace_after_first_pdu(source: DataSetSource, *args: Any) -> Any:
        pdus = encode_pdus(source, *args)
        yield next(pdus)
        _replace_with_a_longer_copy(path)
        yield from pdus

    if when == "after its first data PDU":
        monkeypatch.setattr(store_request, "encode_pdus", replace_after_first_pdu)
    with associate(peer, "GVRNODE", [build_context(item.sop_class_uid, [item.transfer_syntax])], 10) as assoc:
        assoc.bind(evt.EVT_DATA_SENT, on_data_sent)
        assoc.bind(evt.EVT_DIMSE_SENT, on_dimse_sent)
        assert not store_request.quiet_sent_events(assoc)
        with pytest.raises(DataSetReadError) as caught:
            send_file(assoc, path, item.sop_class_uid, item.sop_instance_uid, item.transfer_syntax)
        assert not assoc.dul.is_alive() or assoc.is_aborted
    assert str(caught.value) == f"could not read local file {path}: it was replaced or changed while it was being sent"
    assert all(size <= 6 + 16384 for size in data_pdus)  # PDUs one by one (a run would be a ~1 MB write)
    assert received == []

# 3. The outbox file cannot be read part way through: the local file and the OS error, not the peer


class FailingFile:
    """An open file whose reads fail with EIO once ``good`` bytes have been read."""

    def __init__(self, file: Any, good: int) -> None:
        self.file, self.good = file, good

    def read(self, size: int = -1) -> bytes:
        if self.file.tell() + max(size, 0) > self.good:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return bytes(self.file.read(size))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def test_a_read_failure_mid_data_set_names_the_file_not_the_peer(
    tmp_path: Path, scp: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    peer, received = scp()
    paths = [write(make_image(generate_uid(), size=1000, seed=seed), tmp_path) for seed in (1, 2, 3)]
    from_file = DataSetSource.from_file

    def failing_second(file: Any, path: Path, offset: int) -> DataSetSource:
        return from_file(FailingFile(file, 1_500_000) if path == paths[1] else file, path, offset)

    monkeypatch.setattr(DataSetSource, "from_file", staticmethod(failing_second))
    answered, error, elapsed = _send([FileToSend.read(path) for path in paths], peer)
    assert error is None and elapsed < QUICK_S
    assert [result.status for result in answered] == [0, None, None]
    assert answered[1].error == f"could not read local file {paths[1]}: [Errno 5] Input/output error"
    assert answered[2].error == (f"not sent: the association was aborted because local file {paths[1].name} "
                                 "could not be read part way through its data set")  # fmt: skip
    assert len(received) == 1  # the first file; the peer never got the half of the second as an object


def test_an_unopenable_file_fails_alone_and_the_association_goes_on(tmp_path: Path, scp: Any) -> None:
    peer, received = scp()
    paths = [write(make_image(generate_uid(), size=64, seed=seed), tmp_path) for seed in (1, 2)]
    items = [FileToSend.read(path) for path in paths]
    paths[0].unlink()
    answered, error, _ = _send(items, peer)
    assert error is None and [result.status for result in answered] == [None, 0]
    assert answered[0].error == f"could not read local file {paths[0]}: [Errno 2] No such file or directory"
    assert len(received) == 1


def test_delivery_with_an_unreadable_outbox_file_says_which_and_retries(
    scp: Any, inferred_job: Any, monkeypatch: pytest.MonkeyPatch  # noqa: F811 - the fixture
) -> None:
    peer, received = scp()
    delivered = inferred_job([peer])
    from_file = DataSetSource.from_file

    def failing(file: Any, path: Path, offset: int) -> DataSetSource:
        return from_file(FailingFile(file, offset + 1000), path, offset)

    monkeypatch.setattr(DataSetSource, "from_file", staticmethod(failing))
    assert run_delivery(delivered.ctx, delivered.job_id, POLICY) == "retry scheduled"
    rows = sorted(delivered.deliveries(), key=lambda row: row.id)
    assert len(rows) == 4 and all(row.status == DeliveryStatus.FAILED for row in rows)
    assert rows[0].error.startswith("could not read local file ") and "[Errno 5] Input/output error" in rows[0].error
    assert all("dropped" not in row.error for row in rows)
    assert delivered.state().state == JobState.INFERRED
    [retry] = delivered.events("delivery.retry")
    assert "could not read local file" in retry.message and "Input/output error" in retry.message
    assert received == []
