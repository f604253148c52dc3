"""C-STORE a Part 10 file's data set as it lies on disk, without decoding and re-encoding it (issue 12).

``Association.send_c_store(path)`` reads the whole file with ``dcmread`` and encodes it
again into a ``BytesIO`` (unless the process-wide ``_config.STORE_SEND_CHUNKED_DATASET``
is set): for a 15 MB result object ~40 ms of CPU, and three copies. ``send_file`` is
that method's chunked branch for one association, without the global: the request
names the file and the offset past its file meta, and the DIMSE provider reads the
data set from there (``node.store_request`` sends it as runs of PDUs). The file is
opened once: offset, length and bytes all come from that one descriptor, so a file
replaced meanwhile fails its C-STORE instead of going out cut short. For a file
pydicom wrote, those are the bytes the re-encoding gives; the presentation context
must carry the file's own transfer syntax (nothing is converted), as ``node.scu``
requests it. Written against pynetdicom 3.0.4's ``send_c_store``.
"""

from __future__ import annotations

import queue
import time
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_preamble
from pydicom.tag import BaseTag
from pynetdicom.dimse_primitives import C_STORE

from node.store_request import DataSetReadError, DataSetSource, attach, os_reason

PRIORITY_LOW = 2  # send_c_store's default priority
PAUSE_POLL_S = 0.0001


class ResponseTimeoutError(TimeoutError):
    """The peer sent no C-STORE response within the DIMSE timeout; the association was aborted (pynetdicom's way)."""

    def __init__(self, timeout: float) -> None:
        super().__init__(f"no C-STORE response within {timeout:g} s; the association was aborted")
        self.timeout = timeout


def send_file(
    assoc: Any, path: Path, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, message_id: int = 1
) -> Dataset:
    """C-STORE the data set of the file at ``path``; returns the status as ``send_c_store`` does.

    The UIDs are the data set's own (``FileToSend``), as ``send_c_store`` takes them from a data set.

    Raises ``ValueError`` when no accepted context has this (SOP class, transfer syntax),
    ``RuntimeError`` when the association is not established, ``DataSetReadError`` when the
    file cannot be read whole as it was when the C-STORE began (the association is aborted
    if part of its data set went out: ``node.store_request``), ``ResponseTimeoutError`` when
    no response came within the DIMSE timeout (the association is aborted). A peer that
    aborts or closes the connection meanwhile gives an empty status, as with ``send_c_store``.
    """
    if not assoc.is_established:
        raise RuntimeError("the association must be established before a C-STORE")
    try:
        file = open(path, "rb", buffering=0)  # noqa: SIM115 - one descriptor for offset, length and bytes sent
    except OSError as error:
        raise DataSetReadError(path, os_reason(error)) from error
    with file:
        request = C_STORE()
        request.MessageID = message_id
        request.Priority = PRIORITY_LOW
        request.AffectedSOPClassUID = sop_class_uid
        request.AffectedSOPInstanceUID = sop_instance_uid
        offset = data_set_offset(file, path)
        request._dataset_path = (path, offset)  # pynetdicom's own path (providers not installed) reads it from here
        attach(request, DataSetSource.from_file(file, path, offset))
        context = assoc._get_valid_context(sop_class_uid, transfer_syntax, "scu", allow_conversion=False)
        return _exchange(assoc, request, context.context_id)


def data_set_offset(file: Any, path: Path) -> int:
    """Where the data set of the open Part 10 ``file`` starts: past its preamble and file meta (``split_dataset``)."""
    try:
        read_preamble(file, False)
        read_dataset(file, is_implicit_VR=False, is_little_endian=True, stop_when=_not_file_meta)
        return int(file.tell())
    except OSError as error:
        raise DataSetReadError(path, os_reason(error)) from error
    except (InvalidDicomError, ValueError, EOFError) as error:
        raise DataSetReadError(path, f"not a Part 10 file we can send ({error})") from error


def _not_file_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag.group != 2


def _exchange(assoc: Any, request: C_STORE, context_id: int) -> Dataset:
    assoc._reactor_checkpoint.clear()  # the reactor must not take our response (node.reactor_gate)
    while not assoc._is_paused:
        time.sleep(PAUSE_POLL_S)
    timed_out = False
    try:
        assoc.dimse.send_msg(request, context_id)
        # get_msg's own wait, but a timeout stays apart from the (None, None) an abort or a closed connection queues
        _, response = assoc.dimse.msg_queue.get(block=True, timeout=assoc.dimse.dimse_timeout)
    except queue.Empty:
        response, timed_out = None, True
    finally:
        assoc._reactor_checkpoint.set()
    if response is None:
        assoc._handle_no_response()  # pynetdicom's reaction: log; abort unless the peer did
        if timed_out:
            raise ResponseTimeoutError(assoc.dimse.dimse_timeout)
        return Dataset()  # the peer aborted or the connection closed
    status: Dataset = assoc._check_received_status(response)
    return status
