"""A cap on the bytes of one DIMSE message while it is received (issue 9, part 3's gap).

pynetdicom assembles a C-STORE's data set in memory from every P-DATA-TF PDU of the
message and only then calls the handler, where ``max_instance_mb`` is checked: a
peer streaming a 4 GB instance costs the node 4 GB (and the copies made while it is
decoded) before it is refused. ``CappedAssociationSocket`` counts the bytes of the
message in flight as the DUL reads them: a PDU whose header says it would take the
message past the cap is refused before its body is read, the connection gets an
A-ABORT and is closed, and ``on_refused`` audits the instance (its SOP UIDs come
from the command set, which precedes the data set). The cap is ``max_instance_mb``
plus room for the command set and the PDV headers, so that whatever passes it the
SCP's own size check still judges by the same rule.

The DUL reads each PDU as two ``recv`` calls, the 6-byte header then the rest
(``DULServiceProvider._read_pdu_data``); this class relies on that, as
``node.pdu_deadline`` does, and is installed on top of it.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from node.pdu_deadline import DeadlineAssociationSocket

log = logging.getLogger(__name__)

P_DATA_TF = 0x04
COMMAND_ROOM = 64 * 1024  # a C-STORE-RQ command set is ~200 bytes; PDV headers are 6 bytes per fragment
# A-ABORT PDU (PS3.8 9.3.8): type 7, length 4, source 0 (DICOM UL service-user), reason not significant
A_ABORT = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0, 0)
_NO_DATA_SET = 0x0101
LINGER_SECONDS = 1.0  # after the A-ABORT, how long the peer's remaining bytes are read and dropped


@dataclass(frozen=True)
class RefusedMessage:
    """What is known of a message refused mid-stream: the command's UIDs (as sent) and the bytes seen."""

    sop_class_uid: str
    sop_instance_uid: str
    received_bytes: int  # of the message, before the refused PDU
    refused_pdu_bytes: int  # the length the refused PDU announced
    max_bytes: int


RefusedCallback = Callable[[Any, RefusedMessage], None]


class MessageTooLargeError(ConnectionAbortedError):
    """The peer's message passed the cap; the DUL sees a closed transport (Evt17) and aborts the association."""


class CappedAssociationSocket(DeadlineAssociationSocket):
    """``DeadlineAssociationSocket`` that also bounds the bytes of the DIMSE message being received."""

    max_message_bytes: int
    on_refused: RefusedCallback | None
    _next_is_body: bool
    _body_is_p_data: bool
    _message_bytes: int
    _command: bytearray | None  # the command set of the message in flight, once its last fragment arrived
    _command_parts: bytearray

    def recv(self, nr_bytes: int) -> bytearray:
        if self._next_is_body:
            self._next_is_body = False
            data = super().recv(nr_bytes)
            if self._body_is_p_data and len(data) == nr_bytes:
                self._count(data)
            return data
        data = super().recv(nr_bytes)
        if len(data) == 6:
            pdu_type, _, length = struct.unpack(">BBL", data)
            self._next_is_body, self._body_is_p_data = True, pdu_type == P_DATA_TF
            if self._body_is_p_data and self._message_bytes + length > self.max_message_bytes:
                self._refuse(length)
        return data

    def _count(self, body: bytes | bytearray) -> None:
        """Follow the PDVs of a P-DATA-TF body: the message in flight grows, or ends and the next starts."""
        offset = 0
        while offset + 6 <= len(body):
            length, _context, control = struct.unpack_from(">LBB", body, offset)
            fragment = memoryview(body)[offset + 6 : offset + 4 + length]
            offset += 4 + length
            self._message_bytes += 4 + length
            if control & 1:  # command fragment
                if len(self._command_parts) + len(fragment) > COMMAND_ROOM:
                    self._refuse(len(body))
                self._command_parts += fragment
                if control & 2:
                    self._command = self._command_parts
                    if _data_set_type(self._command) == _NO_DATA_SET:
                        self._end_message()
            elif control & 2:  # last data set fragment
                self._end_message()

    def _end_message(self) -> None:
        self._message_bytes, self._command, self._command_parts = 0, None, bytearray()

    def _refuse(self, pdu_length: int) -> None:
        command = self._command if self._command is not None else self._command_parts
        refused = RefusedMessage(
            sop_class_uid=_command_uid(command, _AFFECTED_SOP_CLASS),
            sop_instance_uid=_command_uid(command, _AFFECTED_SOP_INSTANCE),
            received_bytes=self._message_bytes,
            refused_pdu_bytes=pdu_length,
            max_bytes=self.max_message_bytes,
        )
        log.warning("peer %s: a DIMSE message passed %.0f MB after %.1f MB (max_instance_mb); association aborted",
                    self.assoc.requestor.address, refused.max_bytes / 2**20, refused.received_bytes / 2**20)  # fmt: skip
        if self.on_refused is not None:
            try:
                self.on_refused(self.assoc, refused)
            except Exception as error:  # noqa: BLE001 - the audit must not keep the oversized stream open
                log.error("could not audit a message refused for its size (%s)", type(error).__name__)
        if self.socket is not None:
            abort_and_linger(self.socket)
        self._end_message()
        raise MessageTooLargeError(
            "the peer's DIMSE message is larger than max_instance_mb; association aborted"
        )


def abort_and_linger(sock: socket.socket, seconds: float = LINGER_SECONDS) -> None:
    """Send an A-ABORT, then read and drop what the peer still sends, until it closes or ``seconds`` pass.

    Closing a socket with unread input sends a TCP reset, and a reset makes the peer's
    kernel drop the A-ABORT it has not read yet: the sender would see only "connection
    reset". Draining first (as web servers' "lingering close" does) lets it read why.
    """
    buffer = bytearray(64 * 1024)
    deadline = time.monotonic() + seconds
    try:
        sock.sendall(A_ABORT)
        sock.shutdown(socket.SHUT_WR)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv_into(buffer):
                return  # the peer read the A-ABORT and closed
    except OSError:
        pass  # reset, gone or too slow: the connection closes either way


_AFFECTED_SOP_CLASS, _DATA_SET_TYPE, _AFFECTED_SOP_INSTANCE = 0x0002, 0x0800, 0x1000  # group 0000 elements


def _command_element(encoded: bytes | bytearray, element: int) -> bytes | None:
    """The value of element (0000,``element``) of an Implicit VR Little Endian command set, or None.

    Walked by hand, not decoded by pydicom: this runs for every message the node receives.
    """
    offset = 0
    while offset + 8 <= len(encoded):
        group, found, length = struct.unpack_from("<HHL", encoded, offset)
        if group == 0 and found == element and offset + 8 + length <= len(encoded):
            return bytes(encoded[offset + 8 : offset + 8 + length])
        offset += 8 + length
    return None


def _data_set_type(encoded: bytes | bytearray) -> int | None:
    value = _command_element(encoded, _DATA_SET_TYPE)
    return int.from_bytes(value, "little") if value is not None and len(value) == 2 else None


def _command_uid(encoded: bytes | bytearray, element: int) -> str:
    """A UID as the peer wrote it (checked by the ingestor before it reaches the audit), or ""."""
    value = _command_element(encoded, element)
    return value.rstrip(b"\0 ").decode("ascii", "replace") if value is not None else ""


def install(assoc_socket: Any, max_instance_bytes: int, on_refused: RefusedCallback | None = None) -> None:
    """Cap messages on an accepted socket that already has the PDU deadline (``node.pdu_deadline.install``)."""
    if not isinstance(assoc_socket, DeadlineAssociationSocket):
        raise TypeError("install the PDU deadline (node.pdu_deadline.install) before the message cap")
    if max_instance_bytes <= 0:
        raise ValueError(f"max_instance_bytes must be positive, got {max_instance_bytes}")
    capped: Any = assoc_socket
    capped.__class__ = CappedAssociationSocket
    capped.max_message_bytes = max_instance_bytes + COMMAND_ROOM
    capped.on_refused = on_refused
    capped._next_is_body = False
    capped._body_is_p_data = False
    capped._end_message()
