"""Why an association we requested was not established, in words a PACS administrator can act on.

pynetdicom reports only flags (``is_rejected``, ``is_aborted``) and logs the
rest. The A-ASSOCIATE-RJ primitive it keeps (``assoc.acceptor.primitive``)
carries result, source and reason; a failed TCP connect leaves nothing, so the
connect is tried once more here, alone, to tell "refused" from "timed out" from
"no such host".
"""

from __future__ import annotations

import socket
from typing import Any

# PS3.8 9.3.4: (source, reason) -> what to check. Source 1 is the peer's application (service user).
_REJECT_HINTS = {
    (1, 3): "the peer does not accept our calling AE title {calling}: declare it on the peer, or pass "
    "--calling-ae with one it knows",
    (1, 7): "the peer's AE title is not {called}: check the part before @",
    (1, 2): "the peer does not speak the DICOM application context",
    (3, 1): "the peer is busy (temporary congestion): try again later",
    (3, 2): "the peer has reached its association limit: try again later",
}


def describe_failure(assoc: Any, peer: Any, calling_ae: str, timeout: float, elapsed: float) -> str:
    """One sentence: rejected (with result, source and reason), aborted, refused, timed out or unresolved.

    ``elapsed``: seconds the request took; pynetdicom aborts on its ACSE timeout, so a
    request that used up the timeout was not answered, whatever the abort flag says.
    """
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    if assoc.is_rejected:
        return f"{where} rejected the association: {describe_rejection(assoc.acceptor.primitive, peer, calling_ae)}"
    answer = getattr(assoc.acceptor, "primitive", None)
    if answer is not None and answer.result == 0:
        return (f"{where} accepted the association but none of the presentation contexts we proposed "
                "(SOP class and transfer syntax): the peer does not take this kind of object")  # fmt: skip
    connect = describe_connect(peer.host, peer.port, timeout)
    if connect is not None:
        return f"{where}: {connect}"
    if assoc.is_aborted and elapsed < 0.9 * timeout:
        return f"{where} aborted the association request (A-ABORT): see the peer's log for why"
    return (f"{where} accepted the TCP connection but did not answer the association request within "
            f"{timeout:g} s (is it a DICOM port? does it expect TLS?)")  # fmt: skip


def describe_rejection(primitive: Any, peer: Any, calling_ae: str) -> str:
    """A-ASSOCIATE-RJ in words: 'rejected permanent by the service user: calling AE title not recognised; ...'."""
    if primitive is None:
        return "A-ASSOCIATE-RJ without details"
    text = (f"A-ASSOCIATE-RJ, {primitive.result_str.lower()}, source {primitive.source_str.lower()}, "
            f"reason: {primitive.reason_str.lower()}")  # fmt: skip
    hint = _REJECT_HINTS.get((primitive.result_source, primitive.diagnostic))
    return text + ("; " + hint.format(calling=calling_ae, called=peer.ae_title) if hint else "")


def describe_connect(host: str, port: int, timeout: float) -> str | None:
    """Connect once more, alone, to say why the association's connect failed; None if it works now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except ConnectionRefusedError:
        return (f"connection refused: nothing listens on port {port} of {host} "
                "(is the peer running, is the port right?)")  # fmt: skip
    except TimeoutError:
        return f"timed out after {timeout:g} s connecting to {host}:{port} (a firewall, or the wrong host?)"
    except socket.gaierror:
        return f"cannot resolve host name {host!r} (check the part after @)"
    except OSError as error:
        return f"cannot connect to {host}:{port}: {error.strerror or error}"
    return None
