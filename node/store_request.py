"""Send a C-STORE request's data set as runs of P-DATA-TF PDUs, not one Python round trip per PDU (issue 12).

pynetdicom's ``DIMSEServiceProvider.send_msg`` cuts the data set into fragments of the
peer's maximum PDU length (16 KB for dcmtk's storescp and Orthanc by default) and hands
each to the DUL as a ``P_DATA`` primitive: a queue put, a reactor pass, a state machine
action, a ``P_DATA_TF`` encoded field by field, two events and a socket write, ~35 us
of Python per PDU. A 15 MB result object is ~900 of them. Here the same PDUs (same
fragment sizes, same PDV headers, same order) are encoded in one loop into runs of
about ``RUN_BYTES`` and each run goes through the DUL as one primitive and one socket
write; the command set still goes out through pynetdicom's own encoder.
tests/node/test_store_request.py compares the bytes on the wire with pynetdicom's.

A run travels as an empty ``P_DATA`` (which pynetdicom never sends) that the DUL
state machine treats like any P-DATA request (DT-1: only on an established
association, in queue order); ``RunSendingDUL._send`` writes the run queued with it.
An association with an EVT_PDU_SENT handler other than pynetdicom's logging one (which
logs nothing for a P-DATA-TF) or any EVT_DATA_SENT handler would see runs instead of
PDUs: there a file's data set goes out as pynetdicom's PDUs, one ``P_DATA`` each
(``encode_pdus``), read through the same ``DataSetSource``, so a file replaced meanwhile
fails alike (pynetdicom would open the path again and send whatever lies there now).
Anything else unusual takes pynetdicom's path: other messages, an empty data set, a
maximum PDU length pynetdicom refuses (1 to 6), a data set in memory on such an association.

Written against pynetdicom 3.0.4; upstream, the same idea is ``DIMSEMessage.encode_msg``
yielding pre-encoded PDUs and the DUL writing them without a state machine pass each.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import deque
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO, cast

from pynetdicom import evt
from pynetdicom._handlers import standard_pdu_sent_handler
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from node.store_response import PDV_OVERHEAD, fragment_size

RUN_BYTES = 1 << 20  # about this much per run: few DUL passes, little memory beyond pynetdicom's own queue
_PDU_HEADER = struct.Struct(">BBIIBB")  # PDU type, reserved, PDU length, item length, context ID, control header
P_DATA_TF_TYPE = 0x04
LAST_COMMAND_FRAGMENT = 0x03
DATA_FRAGMENT, LAST_DATA_FRAGMENT = 0x00, 0x02  # message control headers (PS3.8 E.2)
SOURCE_ATTRIBUTE = "_gvr_dataset_source"  # on a C_STORE primitive: the DataSetSource to send (attach)


class DataSetReadError(OSError):
    """A data set file could not be read whole, as it was when its C-STORE began: a local fault, not the peer's."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"could not read local file {path}: {reason}")
        self.path = path


def os_reason(error: OSError) -> str:
    """``[Errno 13] Permission denied``: the OS error without the file name (the message names it once)."""
    return f"[Errno {error.errno}] {error.strerror}" if error.errno is not None else str(error)


class DataSetSource:
    """The encoded data set of a C-STORE request: a file from an offset (``send_c_store(path)``) or memory.

    A file is read through one descriptor, opened before its length is taken (``os.fstat``); after
    the last piece it must be at its end and still the file at ``path``, unchanged, or
    ``chunks`` raises ``DataSetReadError``: a file replaced or rewritten meanwhile is never sent cut short.
    """

    def __init__(
        self, length: int, path: Path | None = None, offset: int = 0, memory: memoryview | None = None,
        file: BinaryIO | None = None, identity: tuple[int, int, int, int] = (0, 0, 0, 0),
    ) -> None:  # fmt: skip
        self.length, self.path, self.offset, self.memory, self.file = length, path, offset, memory, file
        self._owns_file = False
        self._identity = identity  # the file's (_identity) when the C-STORE began

    @classmethod
    def of(cls, primitive: Any) -> DataSetSource | None:
        """Where the primitive's data set is, or None when it has none (or an unusual one).

        As in pynetdicom's ``encode_msg``, a ``DataSet`` wins over ``_dataset_path`` when both are set;
        a source ``attach``-ed by ``node.store_file`` (an open file) wins over the path it names.
        """
        data_set = getattr(primitive, "DataSet", None)
        if data_set is not None:
            if not isinstance(data_set, BytesIO):
                return None
            memory = data_set.getbuffer()
            return cls(len(memory), memory=memory) if len(memory) else None
        attached = getattr(primitive, SOURCE_ATTRIBUTE, None)
        if isinstance(attached, DataSetSource):
            return attached if attached.length > 0 else None
        dataset_path = getattr(primitive, "_dataset_path", None)
        if not dataset_path:
            return None
        source = cls.open(Path(dataset_path[0]), int(dataset_path[1]))
        if source.length > 0:
            return source
        source.close()
        return None

    @classmethod
    def open(cls, path: Path, offset: int) -> DataSetSource:
        """The data set of the file at ``path`` from ``offset``, through a descriptor this source owns (``close``)."""
        try:
            file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close() or at the end of chunks()
        except OSError as error:
            raise DataSetReadError(path, os_reason(error)) from error
        source = cls.from_file(file, path, offset)
        source._owns_file = True
        return source

    @classmethod
    def from_file(cls, file: BinaryIO, path: Path, offset: int) -> DataSetSource:
        """The data set of an open file from ``offset``; its length from the same descriptor (the caller closes it)."""
        opened = os.fstat(file.fileno())
        return cls(opened.st_size - offset, path, offset, file=file, identity=_identity(opened))

    def close(self) -> None:
        if self._owns_file and self.file is not None:
            self.file.close()

    def chunks(self, size: int) -> Iterator[memoryview]:
        """The data set in pieces of ``size`` bytes (the last one shorter)."""
        if self.memory is not None:
            for start in range(0, self.length, size):
                yield self.memory[start : start + size]
            return
        if self.file is None or self.path is None:
            raise ValueError("a data set source needs a file or memory")
        try:
            yield from self._file_chunks(self.file, self.path, size)
        finally:
            self.close()

    def _file_chunks(self, file: BinaryIO, path: Path, size: int) -> Iterator[memoryview]:
        try:
            file.seek(self.offset)
            for start in range(0, self.length, size):
                want = min(size, self.length - start)
                piece = file.read(want)
                if len(piece) != want:
                    raise DataSetReadError(path, f"it ended after {self.offset + start + len(piece)} of "
                                                 f"{self.offset + self.length} bytes (changed while it was sent)")
                if start + want == self.length:
                    self._check_unchanged(file, path)  # before the last piece: the peer never holds it whole
                yield memoryview(piece)
        except DataSetReadError:
            raise
        except OSError as error:
            raise DataSetReadError(path, os_reason(error)) from error

    def _check_unchanged(self, file: BinaryIO, path: Path) -> None:
        """At the data set's end: nothing more to read, same size and time, and still the file at ``path``."""
        grown = file.read(1) != b""
        now = _identity(os.fstat(file.fileno()))
        on_disk = os.stat(path)
        if grown or now != self._identity or (on_disk.st_dev, on_disk.st_ino) != now[:2]:
            raise DataSetReadError(path, "it was replaced or changed while it was being sent")


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What tells a file's version apart: device, inode, size, modification time."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def attach(primitive: Any, source: DataSetSource) -> None:
    """Have ``StoreRequestDIMSE`` send ``source`` (an open file) as the primitive's data set."""
    setattr(primitive, SOURCE_ATTRIBUTE, source)


def encode_runs(source: DataSetSource, context_id: int, max_pdu_length: int) -> Iterator[bytearray]:
    """The data set's P-DATA-TF PDUs, byte for byte ``DIMSEMessage.encode_msg``'s, in runs of ~``RUN_BYTES``.

    One PDV per PDU, each fragment ``max_pdu_length - 6`` bytes (the whole data set when 0).
    """
    fragment = fragment_size(source.length, max_pdu_length)
    per_run = max(1, RUN_BYTES // (fragment + _PDU_HEADER.size))
    remaining = source.length
    for chunk in source.chunks(per_run * fragment):
        pieces = range(0, len(chunk), fragment)
        run = bytearray(len(chunk) + _PDU_HEADER.size * len(pieces))
        view, position = memoryview(run), 0
        for start in pieces:
            piece = chunk[start : start + fragment]
            remaining -= len(piece)
            control = DATA_FRAGMENT if remaining else LAST_DATA_FRAGMENT
            _PDU_HEADER.pack_into(run, position, P_DATA_TF_TYPE, 0, len(piece) + 6, len(piece) + 2, context_id,
                                  control)  # fmt: skip
            position += _PDU_HEADER.size
            view[position : position + len(piece)] = piece
            position += len(piece)
        yield run


def encode_pdus(source: DataSetSource, context_id: int, max_pdu_length: int) -> Iterator[P_DATA]:
    """The data set's ``P_DATA`` primitives, one per PDU, as ``DIMSEMessage.encode_msg`` makes them.

    For an association whose handlers see each PDU; read through ``source``, so checked as for runs.
    """
    fragment = fragment_size(source.length, max_pdu_length)
    remaining = source.length
    for piece in source.chunks(fragment):
        remaining -= len(piece)
        control = DATA_FRAGMENT if remaining else LAST_DATA_FRAGMENT
        p_data = P_DATA()
        p_data.presentation_data_value_list.append((context_id, bytes((control,)) + piece))
        yield p_data


def quiet_sent_events(assoc: Any) -> bool:
    """True when no handler could tell runs from PDUs: no EVT_DATA_SENT, only pynetdicom's EVT_PDU_SENT logger."""
    pdu_handlers = assoc.get_handlers(evt.EVT_PDU_SENT)
    return not assoc.get_handlers(evt.EVT_DATA_SENT) and all(
        func is standard_pdu_sent_handler for func, _ in pdu_handlers
    )


class RunSendingDUL(DULServiceProvider):
    """``DULServiceProvider`` that writes a queued run when the state machine sends an empty P-DATA-TF."""

    _runs: deque[bytearray]
    _runs_lock: threading.Lock

    def send_run(self, run: bytearray) -> None:
        """Queue ``run`` (complete P-DATA-TF PDUs) behind everything already queued to send."""
        with self._runs_lock:  # the run and its marker enter their queues in the same order
            self._runs.append(run)
            self.send_pdu(P_DATA())

    def _send(self, pdu: Any) -> None:
        if type(pdu) is P_DATA_TF and not pdu.presentation_data_value_items:
            run = self._runs.popleft()
            if self.socket is not None:
                # a view, so pynetdicom's slicing after a partial write copies nothing; only len() and slices are used
                self.socket.send(cast(bytes, memoryview(run)))
                return
        super()._send(pdu)


class StoreRequestDIMSE(DIMSEServiceProvider):
    """``DIMSEServiceProvider`` that sends a C-STORE request's data set as runs (``encode_runs``).

    Where handlers see each PDU (``quiet_sent_events`` False), a file's data set goes as
    pynetdicom's PDUs (``encode_pdus``), through the same checked ``DataSetSource``.
    """

    def send_msg(self, primitive: Any, context_id: int) -> None:
        max_pdu_length = self.maximum_pdu_size
        source = self._data_set_source(primitive, max_pdu_length)
        dul = self.dul
        as_runs = quiet_sent_events(self.assoc)
        if source is None or not isinstance(dul, RunSendingDUL) or (source.file is None and not as_runs):
            if source is not None:
                source.close()
            super().send_msg(primitive, context_id)
            return
        message = C_STORE_RQ()
        message.primitive_to_message(primitive)
        message.context_id = context_id
        evt.trigger(self.assoc, evt.EVT_DIMSE_SENT, {"message": message})
        for p_data in message.encode_msg(context_id, max_pdu_length):  # the command set, pynetdicom's own
            dul.send_pdu(p_data)
            if p_data.presentation_data_value_list[0][1][0] == LAST_COMMAND_FRAGMENT:
                break  # the data set follows, as runs or as PDUs
        try:
            if as_runs:
                for run in encode_runs(source, context_id, max_pdu_length):
                    dul.send_run(run)
            else:
                for p_data in encode_pdus(source, context_id, max_pdu_length):
                    dul.send_pdu(p_data)
        except BaseException:
            self.assoc.abort()  # the peer holds half a message: nothing later on this association could be read
            raise
        finally:
            source.close()

    def _data_set_source(self, primitive: Any, max_pdu_length: int) -> DataSetSource | None:
        """The C-STORE request's data set to send ourselves, or None for pynetdicom's path (module docstring)."""
        if type(primitive) is not C_STORE or primitive.MessageIDBeingRespondedTo is not None:
            return None
        if 0 < max_pdu_length <= PDV_OVERHEAD:
            return None
        return DataSetSource.of(primitive)


def install(assoc: Any) -> bool:
    """Make ``assoc`` send C-STORE data sets as runs; False (and unchanged) if its DUL or DIMSE is not plain."""
    dul, dimse = assoc.dul, assoc.dimse
    if type(dul) is not DULServiceProvider or type(dimse) is not DIMSEServiceProvider:
        return False
    dul.__class__ = RunSendingDUL
    runs = cast(RunSendingDUL, dul)
    runs._runs, runs._runs_lock = deque(), threading.Lock()
    dimse.__class__ = StoreRequestDIMSE
    return True
