"""A whole-PDU deadline and a minimum data rate for accepted associations (issue 9, part 6).

pynetdicom reads a PDU with blocking ``recv`` calls whose timeout (``network_timeout``)
applies to each read, so a peer sending one byte every few seconds never times out:
16 connections dribbling an A-ASSOCIATE-RQ at 1 byte / 2 s held every association slot
for 50+ s, and a P-DATA at 1 byte / s stayed open 56 s. ``DeadlineAssociationSocket``
gives each PDU one deadline, counted from its first byte: ``pdu_seconds`` plus its
length at ``min_bytes_per_second``. Past it the read raises ``TimeoutError``, which
pynetdicom's ``DULServiceProvider._read_pdu_data`` already turns into "transport closed"
(Evt17): the connection is closed. The first PDU is the A-ASSOCIATE-RQ, so this is
also the whole-association-request deadline; as pynetdicom's acceptor thread would
still wait ``acse_timeout`` for that request (holding the slot), it is woken too.

Written to go upstream as an ``AssociationSocket`` option; until then ``install``
converts the socket pynetdicom created (``RequestHandler._create_association`` has no
hook for the class), before the association's reactor thread starts reading.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from pynetdicom.transport import AssociationSocket

log = logging.getLogger(__name__)

_HEADER_BYTES = 6  # PDU type, reserved, 4-byte length: the DUL reads these first, then the rest
_MAX_READ = 1 << 20  # first buffer: a whole PDU of the usual sizes (16 KB to 128 KB) in one read


class DeadlineAssociationSocket(AssociationSocket):
    """``AssociationSocket`` whose ``recv`` enforces a deadline per PDU, not per read."""

    pdu_seconds: float
    min_bytes_per_second: float
    read_timeout: float | None  # the socket's own per-read timeout, still applied
    _pdu_started: float | None

    def recv(self, nr_bytes: int) -> bytearray:
        now = time.monotonic()
        header = self._pdu_started is None
        if header:
            self._pdu_started = now
            deadline = now + self.pdu_seconds
        else:
            assert self._pdu_started is not None
            deadline = self._pdu_started + self.pdu_seconds + nr_bytes / self.min_bytes_per_second
        try:
            data = self._recv_until(nr_bytes, deadline)
        except BaseException:
            self._pdu_started = None
            raise
        if not header or len(data) < nr_bytes:  # the PDU is whole (or the peer closed): next read starts one
            self._pdu_started = None
        return data

    def _recv_until(self, nr_bytes: int, deadline: float) -> bytearray:
        """Read into one buffer, as much as the kernel holds per call.

        issue 12: pynetdicom reads 4 KB per ``recv`` (~130 calls and copies per 0.5 MB
        instance); ``recv_into`` the final buffer reads what has arrived in one call.
        The buffer grows only as bytes arrive: the length is the peer's claim.
        """
        sock = self.socket
        assert sock is not None
        data, received = bytearray(min(nr_bytes, _MAX_READ)), 0
        while received < nr_bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("peer %s sent %d of %d bytes of a PDU part before its deadline; connection closed",
                            _peer(sock), received, nr_bytes)  # fmt: skip
                self._wake_acceptor()
                raise TimeoutError("the peer did not send a whole PDU before its deadline")
            sock.settimeout(min(left, self.read_timeout) if self.read_timeout else left)
            if received == len(data):
                data.extend(bytes(min(len(data), nr_bytes - received)))  # doubles, never past the PDU
            try:
                with memoryview(data)[received:] as view:
                    count = sock.recv_into(view)
            except TimeoutError:
                if time.monotonic() < deadline:
                    raise  # silent for the per-read timeout (network_timeout), as before
                continue  # the loop raises with the deadline's message
            if not count:
                del data[received:]
                return data  # closed by the peer: pynetdicom sees a short read
            received += count
        return data

    def _wake_acceptor(self) -> None:
        """Before the association is established, its thread waits ``acse_timeout`` for the request
        whatever the transport does; ``None`` is what that wait returns on timeout: it ends now."""
        assoc = self.assoc
        if assoc.is_acceptor and not assoc.is_established:
            assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]


def install(assoc_socket: Any, pdu_seconds: float, min_bytes_per_second: float) -> None:
    """Give pynetdicom's accepted ``AssociationSocket`` the per-PDU deadline (call before its reactor starts)."""
    if pdu_seconds <= 0 or min_bytes_per_second <= 0:
        raise ValueError(f"PDU deadline {pdu_seconds} s and rate {min_bytes_per_second} B/s must be positive")
    assoc_socket.read_timeout = assoc_socket.socket.gettimeout() if assoc_socket.socket is not None else None
    assoc_socket.__class__ = DeadlineAssociationSocket
    assoc_socket.pdu_seconds = pdu_seconds
    assoc_socket.min_bytes_per_second = min_bytes_per_second
    assoc_socket._pdu_started = None


def _peer(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "?"
