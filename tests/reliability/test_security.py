"""Security at the door: unknown calling AE titles rejected and audited; TLS with client certificates.

Certificates come from the ``openssl`` CLI (``tests.pki``): a test CA, the node's
server certificate (SAN IP 127.0.0.1), a client certificate from the same CA, and a
client certificate from a second, untrusted CA.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from sqlalchemy import select

from node.audit.db import AuditDB
from node.audit.models import Association, AssociationOutcome
from tests.factories import write
from tests.peers import LOOPBACK, free_port
from tests.pki import Pki, make_pki
from tests.reliability.harness import (
    CALLING_AE,
    FIGURES,
    ManagedProcess,
    base_env,
    phi_image,
    send_paths,
    start_node,
    wait_until,
)

VERIFICATION = "1.2.840.10008.1.1"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), CALLING_AE)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[dict[str, str], list[ManagedProcess]]]:
    env = base_env(data_dir=str(tmp_path / "data"), port=str(free_port()), allowed_calling_aets=CALLING_AE,
                   min_free_disk_mb="0", acse_timeout="3", network_timeout="5")  # fmt: skip
    started: list[ManagedProcess] = []
    yield env, started
    for process in started:
        process.stop()


def _associations(data_dir: str) -> list[Association]:
    audit = AuditDB(f"sqlite:///{Path(data_dir) / 'audit.sqlite3'}")
    try:
        with audit.session() as session:
            return list(session.scalars(select(Association).order_by(Association.id)))
    finally:
        audit.dispose()


def test_unknown_calling_ae_rejected_and_audited(node: tuple[dict[str, str], list[ManagedProcess]],
                                                 tmp_path: Path) -> None:  # fmt: skip
    """A calling AE title outside allowed_calling_aets is rejected, with a REJECTED row naming it."""
    env, started = node
    started.append(start_node(env, tmp_path / "gvr-node-security.log"))
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(LOOPBACK, int(env["GVR_PORT"]), ae_title="GVRNODE")
    assert assoc.is_rejected
    FIGURES.bad_inputs_tried += 1
    rows = wait_until(lambda: _associations(env["GVR_DATA_DIR"]), 10, "the rejection's audit row")
    assert rows[-1].outcome == AssociationOutcome.REJECTED and rows[-1].calling_ae == "INTRUDER"
    assert "INTRUDER" in (rows[-1].reason or "")
    FIGURES.bad_inputs_refused += 1


def _tls_association_established(port: int, context: ssl.SSLContext | None) -> bool:
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(LOOPBACK, port, ae_title="GVRNODE", tls_args=(context, LOOPBACK) if context else None)
    established = bool(assoc.is_established)
    if established:
        assert assoc.send_c_echo().Status == 0
        assoc.release()
    return established


def test_tls_required_test_ca_client_works_plain_refused(
    node: tuple[dict[str, str], list[ManagedProcess]], pki: Pki, tmp_path: Path
) -> None:
    """With tls_ca set: the test CA's client certificate associates and stores; plain, no cert, rogue CA fail."""
    env, started = node
    env.update(pki.server_env())
    started.append(start_node(env, tmp_path / "gvr-node-tls.log"))
    port = int(env["GVR_PORT"])

    trusted = pki.client_context(pki.client_cert, pki.client_key)
    assert _tls_association_established(port, trusted)
    image = write(phi_image(), tmp_path / "tls")
    assert send_paths(port, [image], tls=(trusted, LOOPBACK)).acknowledged == [image.stem]

    refused = {
        "plain": _tls_association_established(port, None),
        "tls without a client certificate": _tls_association_established(port, pki.client_context()),
        "client certificate from another CA": _tls_association_established(
            port, pki.client_context(pki.rogue_cert, pki.rogue_key)),
    }  # fmt: skip
    assert refused == dict.fromkeys(refused, False)
    FIGURES.bad_inputs_tried += len(refused)
    FIGURES.bad_inputs_refused += len(refused)
    rows = _associations(env["GVR_DATA_DIR"])
    assert [row.tls for row in rows if row.outcome != AssociationOutcome.REJECTED] == [True, True]


def test_a_caller_that_never_starts_tls_does_not_stop_the_node_serving_others(
    node: tuple[dict[str, str], list[ManagedProcess]], pki: Pki, tmp_path: Path
) -> None:
    """TCP connections that send nothing (or half a ClientHello) stay open while a trusted client associates,
    with the default ACSE timeout: the handshake runs in each connection's thread, not the accepting one."""
    env, started = node
    env.update(pki.server_env())
    env.pop("GVR_ACSE_TIMEOUT")  # the default (30 s): the trusted client must not wait for it
    started.append(start_node(env, tmp_path / "gvr-node-tls-silent.log"))
    port = int(env["GVR_PORT"])
    silent = [socket.create_connection((LOOPBACK, port)) for _ in range(3)]
    silent[0].sendall(b"\x16\x03\x01\x02\x00\x01")  # a TLS record header and the start of a ClientHello
    try:  # before: the trusted client waited behind the first silent caller for good
        served: list[bool] = []
        trusted = pki.client_context(pki.client_cert, pki.client_key)
        client = threading.Thread(target=lambda: served.append(_tls_association_established(port, trusted)),
                                  daemon=True)  # fmt: skip
        client.start()
        client.join(20)
        assert served == [True], "a trusted TLS client was not served within 20 s beside silent connections"
    finally:
        for connection in silent:
            connection.close()
    assert [row.tls for row in _associations(env["GVR_DATA_DIR"])] == [True]


def test_a_tls_handshake_that_never_comes_is_closed_at_the_acse_timeout(
    node: tuple[dict[str, str], list[ManagedProcess]], pki: Pki, tmp_path: Path
) -> None:
    """The silent connection is closed after acse_timeout (3 s here), with a log line naming the peer."""
    env, started = node
    env.update(pki.server_env())
    log = tmp_path / "gvr-node-tls-deadline.log"
    started.append(start_node(env, log))
    with socket.create_connection((LOOPBACK, int(env["GVR_PORT"]))) as connection:
        connection.settimeout(20)
        began = time.monotonic()
        assert connection.recv(1) == b""  # closed by the node
        assert 2.5 <= time.monotonic() - began < 15
    wait_until(lambda: "no TLS handshake within 3 s" in log.read_text(), 10, "the log line")
    assert f"connection from {LOOPBACK} closed" in log.read_text()
    assert _associations(env["GVR_DATA_DIR"]) == []
