"""The node's calling side: C-ECHO and C-STORE to a peer (PACS, another node, a test SCP).

One presentation context per (SOP class, transfer syntax) found in the files, so
nothing is ever transcoded; TCP_NODELAY on every socket we open. Every association
gets a ``node.reactor_gate.ReactorGate``, held before each request, so pynetdicom's
reactor thread can never take a C-STORE response meant for ``send_c_store``, and sends
its files' data sets as they lie on disk (``node.store_file``: not decoded and encoded
again) through ``node.store_request`` (runs of PDUs, pynetdicom's bytes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node import store_request
from node.association_failure import describe_connect, describe_failure
from node.config import Peer
from node.reactor_gate import hold_reactor, install
from node.scp import set_nodelay
from node.store_file import ResponseTimeoutError, send_file
from node.store_request import DataSetReadError

log = logging.getLogger(__name__)
MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts per association


class PeerUnreachableError(ConnectionError):
    """The peer refused, rejected or dropped the association, or did not answer in time; the message says which."""


@dataclass(frozen=True)
class FileToSend:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str

    @classmethod
    def read(cls, path: Path) -> FileToSend:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return cls(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID))
        except (InvalidDicomError, AttributeError, OSError, ValueError) as error:
            raise ValueError(f"{path} is not a DICOM file we can send: {error}") from error


@dataclass(frozen=True)
class SendResult:
    path: Path
    status: int | None  # None: no response (association dropped)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and (self.status == 0 or self.status & 0xF000 == 0xB000)


@contextmanager
def associate(peer: Peer, calling_ae: str, contexts: list[Any], timeout: float = 30.0) -> Iterator[Association]:
    """An established association with TCP_NODELAY; released (or aborted) on exit."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.requested_contexts = contexts
    started = time.monotonic()
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    except OSError as error:  # pynetdicom resolves the host name before it connects
        reason = describe_connect(peer.host, peer.port, timeout) or str(error)
        raise PeerUnreachableError(f"{peer}: {reason}") from error
    if not assoc.is_established:
        raise PeerUnreachableError(describe_failure(assoc, peer, calling_ae, timeout, time.monotonic() - started))
    if assoc.dul.socket is not None and assoc.dul.socket.socket is not None:
        set_nodelay(assoc.dul.socket.socket)
    install(assoc)
    store_request.install(assoc)  # data sets go out as runs of PDUs: the same bytes, far less Python per PDU
    try:
        yield assoc
    finally:
        if _usable(assoc) and hold_reactor(assoc):
            assoc.release()
        else:
            assoc.abort()


def echo(peer: Peer, calling_ae: str, timeout: float = 10.0) -> int:
    """C-ECHO; returns the status (0 is success). Raises PeerUnreachableError."""
    with associate(peer, calling_ae, [build_context(Verification)], timeout) as assoc:
        if not hold_reactor(assoc):
            raise PeerUnreachableError(f"{peer} ended the association before the C-ECHO")
        response = assoc.send_c_echo()
    if "Status" not in response:
        raise PeerUnreachableError(f"{peer} sent no C-ECHO response")
    return int(response.Status)


def send_files(
    files: Iterable[FileToSend], peer: Peer, calling_ae: str, timeout: float = 30.0,
    on_result: Callable[[FileToSend, SendResult], None] | None = None,
) -> list[SendResult]:  # fmt: skip
    """C-STORE every file, ``MAX_CONTEXTS`` (class, syntax) pairs per association.

    ``on_result`` is called after each C-STORE with the peer's answer, before the
    next one, so a caller can record what the peer acknowledged even if the
    association (or this process) dies later.
    """
    results: list[SendResult] = []
    for batch in _batches_by_context(list(files)):
        contexts = sorted({(f.sop_class_uid, f.transfer_syntax) for f in batch})
        requested = [build_context(sop_class, [syntax]) for sop_class, syntax in contexts]
        with associate(peer, calling_ae, requested, timeout) as assoc:
            for item, result in _store_batch(assoc, batch, peer):
                results.append(result)
                if on_result is not None:
                    on_result(item, result)
    return results


def _store_batch(assoc: Association, batch: list[FileToSend], peer: Peer) -> Iterator[tuple[FileToSend, SendResult]]:
    """Each file's result, in order, on one association.

    Raises ``PeerUnreachableError`` once the association has ended under us, or once we aborted
    it because the peer sent no C-STORE response within the DIMSE timeout (the message says
    which); after our own abort for a file that could not be read part way through, the rest
    are failed, not sent.
    """
    aborted_for: str | None = None
    for item in batch:
        if aborted_for is not None:
            yield item, SendResult(item.path, None, f"not sent: the association was aborted because {aborted_for}")
            continue
        try:
            result = _store_one(assoc, item)
        except DataSetReadError as error:  # ours, not the peer's: the audit row names the file and the OS error
            yield item, SendResult(item.path, None, str(error))
            if not _usable(assoc):
                aborted_for = f"local file {item.path.name} could not be read part way through its data set"
            continue
        except ResponseTimeoutError as error:
            yield item, SendResult(item.path, None, str(error))
            raise PeerUnreachableError(f"{peer} sent no C-STORE response within {error.timeout:g} s for "
                                       f"{item.path.name} and the association was aborted") from error  # fmt: skip
        yield item, result
        if not _usable(assoc):
            raise PeerUnreachableError(f"{peer} dropped the association after {item.path.name}")


def _usable(assoc: Association) -> bool:
    """Established and its DUL thread alive: after the peer's A-ABORT or a closed connection the DUL
    ends, but ``is_established`` stays True (pynetdicom's reactor is held in its gate and never sees it)."""
    return bool(assoc.is_established and assoc.dul.is_alive())


def _store_one(assoc: Association, item: FileToSend) -> SendResult:
    if not assoc.dul.is_alive() or not hold_reactor(assoc):  # the DUL or the reactor ended: so did the association
        return SendResult(item.path, None, "the association ended before this C-STORE")
    try:
        response = send_file(assoc, item.path, item.sop_class_uid, item.sop_instance_uid, item.transfer_syntax)
    except (DataSetReadError, ResponseTimeoutError):
        raise
    except (ValueError, OSError) as error:
        return SendResult(item.path, None, str(error))
    status = int(response.Status) if "Status" in response else None
    if status is None:
        ended = "" if assoc.dul.is_alive() else ": the association ended during this C-STORE"
        return SendResult(item.path, None, f"no response{ended}")
    return SendResult(item.path, status, None)


def _batches_by_context(files: list[FileToSend]) -> Iterator[list[FileToSend]]:
    batch: list[FileToSend] = []
    seen: set[tuple[str, str]] = set()
    for item in files:
        key = (item.sop_class_uid, item.transfer_syntax)
        if key not in seen and len(seen) == MAX_CONTEXTS:
            yield batch
            batch, seen = [], set()
        seen.add(key)
        batch.append(item)
    if batch:
        yield batch
