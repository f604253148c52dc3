"""The storage SCP: pynetdicom server with handlers bound to spool, audit and settings.

Verification and Storage for the image storage SOP classes and SR, the transfer
syntaxes the node keeps as received (no transcoding). Association audit rows come
from pynetdicom's notification events; the C-STORE handler delegates to ``Ingestor``.
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from typing import Any

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from node import reactor_wakeup, store_response
from node.audit.db import AuditDB, add_event
from node.audit.models import Association, AssociationOutcome, utcnow
from node.config import Settings
from node.context_copy import quick_copying
from node.errors import StoreStatus
from node.ingest import Ingestor, StoreRequest
from node.limits import MB
from node.message_cap import RefusedMessage
from node.message_cap import install as install_message_cap
from node.pdu_deadline import install
from node.reuse_port import ReusePortAssociationServer
from node.storage_classes import ACCEPTED_TRANSFER_SYNTAXES, storage_sop_classes
from node.supervision import describe_error
from node.tls_handshake import HandshakeInThreadServer, NodeAE

log = logging.getLogger(__name__)

ReleaseCallback = Callable[[set[str]], None]
ROW_WAIT_SECONDS = 2.0  # an aborted message waits this long at most for its association's audit row


def set_nodelay(sock: socket.socket) -> None:
    """Disable Nagle's algorithm: on loopback it costs ~40 ms per DIMSE exchange."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass  # not a TCP socket (e.g. already closed): nothing to tune


class AssociationLog:
    """Audit rows for associations, keyed by the live pynetdicom Association object."""

    def __init__(self, audit: AuditDB, actor: str) -> None:
        self.audit = audit
        self.actor = actor
        self._rows: dict[int, int] = {}
        self._studies: dict[int, set[str]] = {}
        self._lock = threading.Condition()  # also signals a new row to wait_row_id

    def open(self, assoc: Any, outcome: AssociationOutcome, reason: str | None = None) -> int | None:
        requestor = assoc.requestor
        row = Association(
            calling_ae=str(requestor.ae_title).strip()[:16],
            called_ae=str(assoc.acceptor.ae_title).strip()[:16],
            peer_ip=str(requestor.address),
            peer_port=int(requestor.port or 0),
            outcome=outcome,
            reason=reason,
            tls=isinstance(assoc.dul.socket.socket, ssl.SSLSocket) if assoc.dul.socket else False,
        )
        if outcome != AssociationOutcome.OPEN:
            row.ended_at = utcnow()
        try:
            with self.audit.session() as session:
                session.add(row)
                session.flush()
                if reason:
                    add_event(session, f"association.{outcome.value}", ("association", row.id), self.actor, reason)
        except SQLAlchemyError as error:
            log.error("could not audit an association: %s", error)
            return None
        with self._lock:
            self._rows[id(assoc)] = row.id
            self._lock.notify_all()
        return row.id

    def row_id(self, assoc: Any) -> int | None:
        with self._lock:
            return self._rows.get(id(assoc))

    def wait_row_id(self, assoc: Any, timeout: float) -> int | None:
        """``row_id`` from a thread that may run before EVT_ACCEPTED's handler wrote the row (the DUL's)."""
        with self._lock:
            self._lock.wait_for(lambda: id(assoc) in self._rows, timeout)
            return self._rows.get(id(assoc))

    def note_study(self, assoc: Any, study_uid: str) -> bool:
        """Record that ``assoc`` sent an instance of ``study_uid``; True the first time for this association."""
        with self._lock:
            studies = self._studies.setdefault(id(assoc), set())
            new = study_uid not in studies
            studies.add(study_uid)
        return new

    def studies_in_flight(self) -> set[str]:
        """Studies an association that is still open has sent instances for (it may send more)."""
        with self._lock:
            return set().union(*self._studies.values()) if self._studies else set()

    def close(self, assoc: Any, outcome: AssociationOutcome) -> set[str]:
        """Record the end; returns the studies this association delivered instances for."""
        with self._lock:
            row_id = self._rows.pop(id(assoc), None)
            studies = self._studies.pop(id(assoc), set())
        if row_id is None:
            return studies
        try:
            with self.audit.session() as session:
                row = session.get(Association, row_id)
                if row is not None and row.outcome == AssociationOutcome.OPEN:
                    row.outcome = outcome
                    row.ended_at = utcnow()
        except SQLAlchemyError as error:
            log.error("could not audit the end of association %s: %s", row_id, error)
        return studies


# -- event handlers: one per event, dependencies bound as arguments -----------------


def handle_conn_open(event: Any, settings: Settings | None = None) -> None:
    if event.assoc.dul.socket is not None and event.assoc.dul.socket.socket is not None:
        set_nodelay(event.assoc.dul.socket.socket)
        # issue 6: an accepted socket blocks without limit, so a peer that stops mid-PDU held this
        # thread and an association slot for ever (tests/reliability/test_bad_inputs.py); with a
        # timeout, pynetdicom's read fails after network_timeout and closes the connection.
        event.assoc.dul.socket.socket.settimeout(event.assoc.network_timeout)
        # issue 9: network_timeout applies per read; a PDU as a whole must arrive within its deadline
        if settings is not None:
            install(event.assoc.dul.socket, settings.pdu_deadline_seconds, settings.min_data_rate_kb * 1024)
    # issue 12: pynetdicom's two threads per association poll (1 ms sleeps); woken by their queues
    # and the socket instead, an instance is served as soon as it arrives and an idle peer costs no CPU
    reactor_wakeup.install(event.assoc)
    # issue 12: the usual C-STORE-RSP encoded directly, not through a pydicom Dataset (~0.4 ms each)
    store_response.install(event.assoc)
    run_checks_first(event.assoc)


def handle_conn_open_cap(event: Any, settings: Settings, ingestor: Ingestor, associations: AssociationLog) -> None:
    """issue 9: max_instance_mb bounds the message while it arrives, not only once pynetdicom has buffered it.

    Bound after ``handle_conn_open``, which installs the PDU deadline this cap builds on.
    """
    transport = event.assoc.dul.socket
    if transport is not None and transport.socket is not None:
        refused = functools.partial(audit_refused_message, ingestor=ingestor, associations=associations)
        install_message_cap(transport, settings.max_instance_mb * MB, refused)


def audit_refused_message(
    assoc: Any, refused: RefusedMessage, ingestor: Ingestor, associations: AssociationLog
) -> None:
    """The REJECTED row of an instance aborted mid-stream, with the UIDs its command set gave."""
    request = StoreRequest(
        data=b"",
        sop_class_uid=refused.sop_class_uid,
        sop_instance_uid=refused.sop_instance_uid,
        association_id=associations.wait_row_id(assoc, ROW_WAIT_SECONDS),  # the DUL thread can be first
    )
    reason = (
        f"the instance passed the {refused.max_bytes / MB:.0f} MB limit (max_instance_mb) while it was received "
        f"({refused.received_bytes / MB:.1f} MB in, a PDU of {refused.refused_pdu_bytes / MB:.1f} MB announced); "
        "association aborted"
    )
    ingestor.refuse(request, StoreStatus.EXCEEDS_RESOURCE_LIMIT, reason)


def run_checks_first(assoc: Any) -> None:
    """Move the association's other EVT_DIMSE_RECV handlers (pynetdicom's logging) after ``handle_dimse_recv``.

    Notification handlers run in order and the first to raise ends the run; pynetdicom's
    logging handler raises on a C-STORE with an empty SOP class UID, which must still be answered.
    """
    others = [(func, args) for func, args in assoc.get_handlers(evt.EVT_DIMSE_RECV) if func is not handle_dimse_recv]
    for func, _ in others:
        assoc.unbind(evt.EVT_DIMSE_RECV, func)
    for func, args in others:
        assoc.bind(evt.EVT_DIMSE_RECV, func, args)


def handle_accepted(event: Any, associations: AssociationLog) -> None:
    associations.open(event.assoc, AssociationOutcome.OPEN)


def handle_rejected(event: Any, associations: AssociationLog, settings: Settings) -> None:
    calling = str(event.assoc.requestor.ae_title).strip()
    if settings.allowed_calling_aets and calling not in settings.allowed_calling_aets:
        reason = f"calling AE title {calling!r} is not in allowed_calling_aets"
    else:
        reason = "association request rejected (called AE title or association limit)"
    log.warning("association from %s rejected: %s", event.assoc.requestor.address, reason)
    associations.open(event.assoc, AssociationOutcome.REJECTED, reason)


def handle_released(event: Any, associations: AssociationLog, on_release: ReleaseCallback | None) -> None:
    studies = associations.close(event.assoc, AssociationOutcome.RELEASED)
    if on_release is not None and studies:
        on_release(studies)


def handle_aborted(event: Any, associations: AssociationLog) -> None:
    associations.close(event.assoc, AssociationOutcome.ABORTED)


def handle_echo(event: Any) -> int:
    return int(StoreStatus.SUCCESS)


def handle_store(event: Any, ingestor: Ingestor, associations: AssociationLog) -> int:
    """C-STORE: success only once the bytes are durable in the spool and audited."""
    try:
        request = StoreRequest(
            data=encoded_instance(event),
            sop_class_uid=str(event.request.AffectedSOPClassUID),
            sop_instance_uid=str(event.request.AffectedSOPInstanceUID),
            association_id=associations.row_id(event.assoc),
            context_sop_class=str(event.context.abstract_syntax),
        )
        result = ingestor.receive(request)
    except Exception as error:  # noqa: BLE001 - the handler boundary: nothing may escape into pynetdicom's thread
        log.error("unexpected failure while storing an instance (%s)", describe_error(error))
        return int(StoreStatus.PROCESSING_FAILURE)
    if result.study_uid is not None:
        associations.note_study(event.assoc, result.study_uid)
    return int(result.status)


_C_STORE_RQ = 0x0001


def handle_dimse_recv(event: Any, ingestor: Ingestor, associations: AssociationLog) -> None:
    """Answer a C-STORE request whose SOP instance or class UID is empty or invalid, at once.

    pynetdicom ignores a request with an empty UID (the peer waits for its network
    timeout) and aborts the association on one it cannot decode, logging the value.
    Here, before it decodes the command, such a request gets its failure status and
    an audit row; its bad UIDs are then blanked, so pynetdicom drops the message.
    """
    try:
        command = event.message.command_set
        if command.get("CommandField") != _C_STORE_RQ:
            return
        uids = {name: str(command.get(name, "") or "") for name in ("AffectedSOPClassUID", "AffectedSOPInstanceUID")}
        if all(value and UID(value).is_valid for value in uids.values()):
            return  # the common case: pynetdicom serves it, handle_store checks the rest
        _refuse_bad_store_request(event, ingestor, associations, uids)
    except Exception as error:  # noqa: BLE001 - the handler boundary: nothing may escape into the DUL thread
        log.error("unexpected failure while checking a C-STORE request (%s)", describe_error(error))


def _refuse_bad_store_request(
    event: Any, ingestor: Ingestor, associations: AssociationLog, uids: dict[str, str]
) -> None:
    message, command = event.message, event.message.command_set
    data = getattr(message.data_set, "getvalue", bytes)()
    result = ingestor.receive(StoreRequest(
        data=data if isinstance(data, bytes) else b"",
        sop_class_uid=uids["AffectedSOPClassUID"],
        sop_instance_uid=uids["AffectedSOPInstanceUID"],
        association_id=associations.row_id(event.assoc),
    ))  # fmt: skip
    for name, value in uids.items():
        if not (value and UID(value).is_valid):
            setattr(command, name, "")  # pynetdicom now finds no valid request and drops it
    if command.get("MessageID") is None:
        return  # nothing to answer to
    response = C_STORE()
    response.MessageIDBeingRespondedTo = int(command.MessageID)
    response.Status = int(result.status)
    if UID(uids["AffectedSOPClassUID"]).is_valid:
        response.AffectedSOPClassUID = uids["AffectedSOPClassUID"]
    event.assoc.dimse.send_msg(response, message.context_id)


# -- the received instance as a DICOM file ---------------------------------------------

_PREAMBLE = b"\x00" * 128 + b"DICM"


def encoded_instance(event: Any) -> bytes:
    """The bytes ``event.encoded_dataset()`` returns, without pydicom's file-meta writer.

    Building and encoding a File Meta dataset through pydicom costs ~0.35 ms per
    instance; the group is seven short elements, encoded here directly. Anything
    unusual (a non-ASCII UID, a data set spooled to disk) takes pynetdicom's path.
    """
    request = event.request
    try:
        sop_class, sop_instance = str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID)
        meta = file_meta_group(sop_class, sop_instance, str(event.context.transfer_syntax))
        body = request.DataSet.getvalue()
    except (AttributeError, UnicodeEncodeError, struct.error):
        fallback: bytes = event.encoded_dataset()
        return fallback
    return b"".join((_PREAMBLE, meta, body))


def file_meta_group(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Group 0002 in Explicit VR Little Endian, as pynetdicom's ``create_file_meta`` fills it."""
    elements = (
        _explicit((0x0002, 0x0001), b"OB", b"\x00\x01"),
        _explicit((0x0002, 0x0002), b"UI", _padded(sop_class_uid, b"\x00")),
        _explicit((0x0002, 0x0003), b"UI", _padded(sop_instance_uid, b"\x00")),
        _explicit((0x0002, 0x0010), b"UI", _padded(transfer_syntax, b"\x00")),
        _IMPLEMENTATION,
    )
    body = b"".join(elements)
    return _explicit((0x0002, 0x0000), b"UL", struct.pack("<I", len(body))) + body


def _padded(value: str, pad: bytes) -> bytes:
    encoded = value.encode("ascii")
    return encoded + pad if len(encoded) % 2 else encoded


def _explicit(tag: tuple[int, int], vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":  # 2 reserved bytes and a 4-byte length
        return struct.pack("<HH2s2xI", tag[0], tag[1], vr, len(value)) + value
    return struct.pack("<HH2sH", tag[0], tag[1], vr, len(value)) + value


_IMPLEMENTATION = _explicit(
    (0x0002, 0x0012), b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")
) + _explicit((0x0002, 0x0013), b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" "))


# -- the server ---------------------------------------------------------------------


def make_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """Server TLS from the settings; with ``tls_ca`` every client must show a certificate."""
    if not settings.tls_enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(settings.tls_cert), keyfile=str(settings.tls_key))
    if settings.tls_ca is not None:
        context.load_verify_locations(cafile=str(settings.tls_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def build_ae(settings: Settings) -> NodeAE:
    # issue 12: with several SCP processes, each binds the port with SO_REUSEPORT; a TLS handshake runs in
    # its connection's thread within the ACSE timeout, so one silent caller cannot stop the server accepting
    server = ReusePortAssociationServer if settings.scp_processes > 1 else HandshakeInThreadServer
    ae = NodeAE(ae_title=settings.ae_title, server_class=server, handshake_timeout=settings.acse_timeout)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu_size
    ae.network_timeout = settings.network_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.acse_timeout = settings.acse_timeout
    ae.require_called_aet = True
    if settings.allowed_calling_aets:
        ae.require_calling_aet = list(settings.allowed_calling_aets)
    ae.add_supported_context(Verification)
    for sop_class in storage_sop_classes():
        ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
    return ae


class StorageSCP:
    """The node's listening side; ``start`` returns once the port is bound."""

    def __init__(
        self,
        settings: Settings,
        ingestor: Ingestor,
        associations: AssociationLog,
        on_release: ReleaseCallback | None = None,
    ) -> None:
        self.settings = settings
        self.ingestor = ingestor
        self.associations = associations
        self.on_release = on_release
        self._server: ThreadedAssociationServer | None = None

    def handlers(self) -> list[tuple[Any, ...]]:
        return [
            (evt.EVT_CONN_OPEN, handle_conn_open, [self.settings]),
            (evt.EVT_CONN_OPEN, handle_conn_open_cap, [self.settings, self.ingestor, self.associations]),
            (evt.EVT_ACCEPTED, handle_accepted, [self.associations]),
            (evt.EVT_REJECTED, handle_rejected, [self.associations, self.settings]),
            (evt.EVT_RELEASED, handle_released, [self.associations, self.on_release]),
            (evt.EVT_ABORTED, handle_aborted, [self.associations]),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, handle_store, [self.ingestor, self.associations]),
            (evt.EVT_DIMSE_RECV, handle_dimse_recv, [self.ingestor, self.associations]),
        ]

    def start(self) -> int:
        """Bind and serve in background threads; returns the bound port."""
        ae = build_ae(self.settings)
        server = ae.start_server(
            (self.settings.bind_address, self.settings.port),
            block=False,
            evt_handlers=self.handlers(),
            ssl_context=make_ssl_context(self.settings),
        )
        if server is None:  # start_server(block=False) always returns its server
            raise RuntimeError("pynetdicom did not return the storage server")
        server.contexts = quick_copying(server.contexts)  # each association copies them: ~30 ms -> ~2 ms
        if self.settings.allowed_peer_ips:
            allowed = set(self.settings.allowed_peer_ips)
            # socketserver asks verify_request before serving a connection: refuse unknown IPs there
            server.verify_request = lambda request, client_address: self._verify_peer(client_address, allowed)  # type: ignore[method-assign]
        self._server = server
        port = int(server.server_address[1])
        log.info("storage SCP %s listening on %s:%d", self.settings.ae_title, self.settings.bind_address, port)
        return port

    def _verify_peer(self, address: Any, allowed: set[str]) -> bool:
        if address[0] in allowed:
            return True
        log.warning("connection from %s refused: not in allowed_peer_ips", address[0])
        try:
            with self.associations.audit.session() as session:
                add_event(session, "connection.refused", ("peer", address[0]), self.associations.actor,
                          f"peer IP {address[0]} is not in allowed_peer_ips")
        except SQLAlchemyError as error:
            log.error("could not audit a refused connection: %s", error)
        return False

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
