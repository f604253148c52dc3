"""C-STORE requests as a hostile or broken peer sends them, past pynetdicom's own checks.

``Association.send_c_store`` picks the context from the data set and validates the
UIDs; a peer need do neither. ``send_raw_store`` builds the request primitive
itself and puts it on the wire through the association's DIMSE provider.
"""

from __future__ import annotations

import io
import queue
import time
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE


@dataclass(frozen=True)
class RawAnswer:
    """The response status (None: none came before the wait ended) and how long it took."""

    status: int | None
    seconds: float


def encode_body(ds: Dataset) -> bytes:
    """The data set without file meta, explicit VR little endian (what a C-STORE carries)."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return bytes(buffer.getvalue())


def send_raw_store(
    assoc: Association, body: bytes, sop_class: str, sop_instance: str, context_id: int, wait: float = 10.0
) -> RawAnswer:
    """Send one C-STORE-RQ with exactly these UIDs on this context; wait up to ``wait`` s for its answer."""
    request = C_STORE()
    request.MessageID = 7
    request._affected_sop_class_uid = sop_class  # the private fields: the setters validate
    request._affected_sop_instance_uid = sop_instance
    request.Priority = 2
    request.DataSet = io.BytesIO(body)
    # pause the association's reactor, as its send_* methods do, or it takes the response first
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    started = time.monotonic()
    try:
        assoc.dimse.send_msg(request, context_id)
        _, response = assoc.dimse.msg_queue.get(block=True, timeout=wait)
    except queue.Empty:
        response = None
    finally:
        assoc._reactor_checkpoint.set()
    status = getattr(response, "Status", None)
    return RawAnswer(None if status is None else int(status), time.monotonic() - started)


def context_ids(assoc: Association) -> dict[str, int]:
    """Accepted abstract syntax -> presentation context ID."""
    return {str(cx.abstract_syntax): int(cx.context_id or 0) for cx in assoc.accepted_contexts}
