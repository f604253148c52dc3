"""issue 12 with TLS: ``gvr node`` with ``scp_processes`` 2 and mutual TLS; every process serves TLS alike.

Each SCP process builds its own server context from the settings it was spawned
with (``node.scp.make_ssl_context``). Which process took a connection is read from
``/proc`` (``serving_pid``): a refused client is held at the TCP level until the
process that accepted it is known, then it sends its ClientHello (or plaintext), so
the refusal is pinned on one process.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import select

from node.audit.models import Association as AssociationRow
from node.audit.models import AssociationOutcome
from tests.factories import DX_FOR_PRESENTATION, make_image, write
from tests.node.test_node_process import NodeProcess, _wait_for
from tests.node.test_scp_processes import serving_pid
from tests.peers import free_port
from tests.pki import Pki, make_pki

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT (Linux)")

CALLING_AE = "GVRSCU"
MAX_TRIES = 40  # connections per kind until both processes refused one: missing one process 40 times is 1 in 10^12


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), CALLING_AE)


@pytest.fixture
def tls_node(tmp_path: Path, pki: Pki) -> Iterator[NodeProcess]:
    node = NodeProcess(tmp_path, scp_processes="2", metrics_port=str(free_port()), acse_timeout="3",
                       network_timeout="5")  # fmt: skip
    node.env.update(pki.server_env())
    node.start()
    _wait_for(lambda: "SCP process(es) listening beside gvr node" in node.log.read_text(), 60, "the SCP process")
    yield node
    node.stop()


def _item(item_type: int, data: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(data)) + data


def associate_rq() -> bytes:
    """A complete A-ASSOCIATE-RQ: Verification on implicit VR little endian, from CALLING_AE to GVRNODE."""
    context = _item(0x20, b"\x01\x00\x00\x00" + _item(0x30, b"1.2.840.10008.1.1") + _item(0x40, b"1.2.840.10008.1.2"))
    body = (struct.pack(">HH", 1, 0) + b"GVRNODE".ljust(16) + CALLING_AE.encode().ljust(16) + b"\x00" * 32
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + context + _item(0x50, _item(0x51, struct.pack(">I", 16384))))
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def try_associate(node: NodeProcess, context: ssl.SSLContext | None) -> tuple[int, bool]:
    """(the process that accepted the connection, whether it answered an A-ASSOCIATE-AC) for one client.

    ``context`` None: the client speaks plain DICOM to the TLS port.
    """
    raw = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    try:
        pid = _wait_for(lambda: serving_pid(node, raw.getsockname()[1]), 10, "the process that accepted")
        sock = raw if context is None else context.wrap_socket(raw, server_hostname="127.0.0.1")
        try:
            sock.sendall(associate_rq())
            answer = sock.recv(1)
        except OSError:  # ssl.SSLError (an alert, a failed handshake) or a reset: refused
            answer = b""
        if answer == b"\x02":
            sock.sendall(struct.pack(">BBI", 0x07, 0, 4) + b"\x00\x00\x00\x00")  # A-ABORT: we only knocked
        return pid, answer == b"\x02"
    finally:
        raw.close()


def closed_rows(node: NodeProcess, at_least: int) -> list[AssociationRow] | None:
    """The audit rows of ended associations, once there are ``at_least``."""
    with node.audit().session() as session:
        rows = list(session.scalars(select(AssociationRow).where(AssociationRow.ended_at.is_not(None))))
    return rows if len(rows) >= at_least else None


def test_both_scp_processes_serve_mutual_tls_and_refuse_clients_without_a_trusted_certificate(
    tls_node: NodeProcess, pki: Pki, tmp_path: Path
) -> None:
    """(a) trusted TLS associations served by both processes store their instances, every audit row tls;
    (b) plaintext, TLS without a certificate and a rogue CA's certificate: refused by each process."""
    node = tls_node
    assert node.proc is not None
    trusted = pki.client_context(pki.client_cert, pki.client_key)
    study_uid = generate_uid()
    served: list[int | None] = []
    while len(served) < 8 or (len(set(served)) < 2 and len(served) < MAX_TRIES):
        ae = AE(ae_title=CALLING_AE)
        ae.add_requested_context(DX_FOR_PRESENTATION, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", node.port, ae_title="GVRNODE", tls_args=(trusted, "127.0.0.1"))
        assert assoc.is_established and assoc.dul.socket is not None
        assert isinstance(assoc.dul.socket.socket, ssl.SSLSocket)
        served.append(serving_pid(node, assoc.dul.socket.socket.getsockname()[1]))
        image = write(make_image(study_uid, seed=len(served)), tmp_path / "tls")
        assert int(assoc.send_c_store(dcmread(image)).Status) == 0
        assoc.release()
    assert None not in served
    assert len(set(served)) == 2, f"{len(served)} TLS associations all went to one process ({set(served)})"

    rows = _wait_for(lambda: closed_rows(node, len(served)), 10, "an audit row per association")
    assert [(row.outcome, row.tls) for row in rows] == [(AssociationOutcome.RELEASED, True)] * len(served)

    assert try_associate(node, trusted)[1], "the raw A-ASSOCIATE-RQ itself is accepted over trusted TLS"
    _wait_for(lambda: closed_rows(node, len(served) + 1), 10, "the aborted raw association's row")
    kinds = {"plain": None, "TLS without a client certificate": pki.client_context(),
             "client certificate from another CA": pki.client_context(pki.rogue_cert, pki.rogue_key)}  # fmt: skip
    pids = set(served)
    for kind, context in kinds.items():
        outcomes: dict[int, list[bool]] = {}
        for _ in range(MAX_TRIES):
            pid, accepted = try_associate(node, context)
            outcomes.setdefault(pid, []).append(accepted)
            if set(outcomes) == pids:
                break
        assert set(outcomes) == pids, f"{kind}: only {set(outcomes)} of {pids} took one of {MAX_TRIES} connections"
        assert outcomes == {pid: [False] * len(tries) for pid, tries in outcomes.items()}, f"{kind}: {outcomes}"
    with node.audit().session() as session:  # a refused client is refused before it is an association
        assert len(list(session.scalars(select(AssociationRow)))) == len(served) + 1
