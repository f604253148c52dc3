"""The storage server's TLS handshake runs in each connection's own thread, with a deadline.

pynetdicom 3.0's ``AssociationServer.get_request`` wraps every accepted socket with
``ssl_context.wrap_socket(..., server_side=True)``, which does the handshake right
there, in the one thread that accepts connections, with no timeout (accepted sockets
block). A caller that opens a TCP connection and sends nothing, or a slow or
malicious ClientHello, therefore stops the SCP from accepting anyone else for as
long as it likes (seen: a trusted TLS client waited > 100 s behind one idle
connection). Here the accepting thread only wraps the socket; the handshake runs at
the start of the connection's thread (``ThreadingMixIn`` starts one per connection),
bounded by ``handshake_timeout`` (the node's ACSE timeout), and a failed or late
handshake closes that connection alone, with a log line naming the peer.

Upstream, the same change is ``do_handshake_on_connect=False`` in ``get_request``
and a bounded ``do_handshake`` in ``process_request_thread``.
"""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)


class HandshakeInThreadServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved out of the accepting thread."""

    handshake_timeout: float = 30.0

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        if self.socket is None:
            raise OSError("the association server has no listening socket")
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket) and not self._handshake(request, client_address):
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)

    def _handshake(self, connection: ssl.SSLSocket, client_address: Any) -> bool:
        previous = connection.gettimeout()
        try:
            connection.settimeout(self.handshake_timeout)
            connection.do_handshake()
            connection.settimeout(previous)
        except (OSError, ValueError) as error:  # ssl.SSLError and TimeoutError are OSErrors
            reason = (f"no TLS handshake within {self.handshake_timeout:g} s (acse_timeout)"
                      if isinstance(error, TimeoutError) else f"TLS handshake failed: {error}")  # fmt: skip
            log.warning("connection from %s closed: %s", _host(client_address), reason)
            return False
        return True


def _host(client_address: Any) -> str:
    return str(client_address[0]) if isinstance(client_address, tuple) and client_address else str(client_address)


class NodeAE(AE):
    """An AE whose non-blocking server is ``server_class`` (a ``HandshakeInThreadServer``) with its deadline."""

    def __init__(self, *args: Any, server_class: type[HandshakeInThreadServer] = HandshakeInThreadServer,
                 handshake_timeout: float = 30.0, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.server_class = server_class
        self.handshake_timeout = handshake_timeout

    def make_server(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("server_class") is ThreadedAssociationServer:
            kwargs["server_class"] = self.server_class
        server = super().make_server(*args, **kwargs)
        if isinstance(server, HandshakeInThreadServer):
            server.handshake_timeout = self.handshake_timeout
        return server
