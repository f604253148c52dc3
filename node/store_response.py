"""Send the usual C-STORE-RSP without building it through pydicom (issue 12).

pynetdicom's ``DIMSEServiceProvider.send_msg`` turns the response primitive into a
``DIMSEMessage`` whose command set is a pydicom ``Dataset``: each value is validated
(UID regexes, ``Dataset.__setattr__``) and the set is encoded twice (once for its
group length). Profiled with 8 storescu associations that was ~15% of the node's CPU
per instance. A C-STORE-RSP is seven short elements in Implicit VR Little Endian; the
common one (status, message ID, the two UIDs, no comment, no offending element) is
encoded here directly, byte for byte what pynetdicom sends, and queued on the DUL the
same way (tests/node/test_store_response.py compares the P-DATA values).

Anything else takes pynetdicom's own path: other messages, an ErrorComment or
OffendingElement, a UID that is not a plain valid one (pydicom would warn or raise on
it), a maximum PDU length pynetdicom refuses, and any association with an
EVT_DIMSE_SENT handler besides pynetdicom's standard logging one (for a C-STORE-RSP
that one logs nothing), since such a handler may read the ``DIMSEMessage``.

Written against pynetdicom 3.0.4; upstream, the same idea is a fast path in
``DIMSEMessage.encode_msg`` for fixed-shape command sets.
"""

from __future__ import annotations

import re
import struct
from typing import Any

from pynetdicom import evt
from pynetdicom._handlers import standard_dimse_sent_handler
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

C_STORE_RSP_FIELD = 0x8001
NO_DATA_SET = 0x0101  # CommandDataSetType: the response carries no data set
LAST_COMMAND_FRAGMENT, COMMAND_FRAGMENT = b"\x03", b"\x01"  # message control header (PS3.8 E.2)
PDV_OVERHEAD = 6  # item length (4) and context ID (1) count against the peer's maximum, and the header byte
MAX_UID_LENGTH = 64
# pydicom's UI regex (valuerep.VR_REGEXES), matched whole: a value it accepts without a warning
_VALID_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def fragment_size(length: int, max_pdu_length: int) -> int:
    """Bytes per PDV fragment of a ``length``-byte message part: all of it when the peer's maximum PDU
    length is 0 (unlimited), else that maximum less ``PDV_OVERHEAD`` (as ``DIMSEMessage.encode_msg``)."""
    return length if max_pdu_length == 0 else max_pdu_length - PDV_OVERHEAD


def _implicit(group_element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, group_element, len(value)) + value


def _uid(group_element: int, value: Any) -> bytes | None:
    """The UI element, padded with a NUL to even length as pydicom writes it; None when it is not plain."""
    if value is None:
        return b""  # pynetdicom leaves the element out
    if not isinstance(value, str) or len(value) > MAX_UID_LENGTH or not _VALID_UID.fullmatch(value):
        return None
    encoded = value.encode("ascii")
    return _implicit(group_element, encoded + b"\x00" if len(encoded) % 2 else encoded)


def _us(value: Any) -> bytes | None:
    if type(value) is not int or not 0 <= value <= 0xFFFF:
        return None
    return struct.pack("<H", value)


def encode_store_response(primitive: Any) -> bytes | None:
    """The C-STORE-RSP command set pynetdicom would encode for ``primitive``, or None if it is not the usual one."""
    if type(primitive) is not C_STORE or primitive.MessageIDBeingRespondedTo is None:
        return None
    if primitive.ErrorComment is not None or primitive.OffendingElement is not None:
        return None
    if getattr(primitive, "_dataset_path", None):
        return None  # pynetdicom would announce and send a data set from that file
    sop_class = _uid(0x0002, primitive.AffectedSOPClassUID)
    sop_instance = _uid(0x1000, primitive.AffectedSOPInstanceUID)
    message_id, status = _us(primitive.MessageIDBeingRespondedTo), _us(primitive.Status)
    if sop_class is None or sop_instance is None or message_id is None or status is None:
        return None
    body = b"".join((
        sop_class,
        _implicit(0x0100, struct.pack("<H", C_STORE_RSP_FIELD)),
        _implicit(0x0120, message_id),
        _implicit(0x0800, struct.pack("<H", NO_DATA_SET)),
        _implicit(0x0900, status),
        sop_instance,
    ))  # fmt: skip
    return _implicit(0x0000, struct.pack("<I", len(body))) + body


def command_p_data(command_set: bytes, context_id: int, max_pdu_length: int) -> list[P_DATA]:
    """The command set as ``DIMSEMessage.encode_msg`` fragments it: one PDV per P-DATA, at most ``max_pdu_length``.

    ``max_pdu_length`` is 0 (unlimited) or at least 7; the caller leaves smaller ones to pynetdicom.
    """
    size = fragment_size(len(command_set), max_pdu_length)
    fragments = [command_set[offset : offset + size] for offset in range(0, len(command_set), size)]
    primitives = []
    for index, fragment in enumerate(fragments):
        header = LAST_COMMAND_FRAGMENT if index == len(fragments) - 1 else COMMAND_FRAGMENT
        primitive = P_DATA()
        primitive.presentation_data_value_list.append((context_id, header + fragment))
        primitives.append(primitive)
    return primitives


def only_standard_sent_handlers(assoc: Any) -> bool:
    """True when no EVT_DIMSE_SENT handler could see a difference: none, or pynetdicom's logging one."""
    return all(func is standard_dimse_sent_handler for func, _ in assoc.get_handlers(evt.EVT_DIMSE_SENT))


class StoreResponseDIMSE(DIMSEServiceProvider):
    """``DIMSEServiceProvider`` that sends the usual C-STORE-RSP from ``encode_store_response``.

    Installed by class assignment on an association's own instance (``install``), so it
    keeps pynetdicom's state and the queues other installers replaced.
    """

    def send_msg(self, primitive: Any, context_id: int) -> None:
        max_pdu_length = self.maximum_pdu_size
        if max_pdu_length == 0 or max_pdu_length > PDV_OVERHEAD:
            command_set = encode_store_response(primitive)
            if command_set is not None and only_standard_sent_handlers(self.assoc):
                for p_data in command_p_data(command_set, context_id, max_pdu_length):
                    self.dul.send_pdu(p_data)
                return
        super().send_msg(primitive, context_id)


def install(assoc: Any) -> None:
    """Make ``assoc`` send its C-STORE responses through ``StoreResponseDIMSE``."""
    if type(assoc.dimse) is DIMSEServiceProvider:
        assoc.dimse.__class__ = StoreResponseDIMSE
