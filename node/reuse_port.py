"""issue 12: the storage server, bound with ``SO_REUSEPORT`` so that several SCP processes share a port.

With ``scp_processes`` above 1, ``gvr node`` and its SCP processes listen on one
address; Linux spreads the incoming connections over them. pynetdicom's
``start_server`` builds a ``ThreadedAssociationServer`` (a ``socketserver.TCPServer``);
the node's AE (``node.tls_handshake.NodeAE``) substitutes this subclass, whose
``server_bind`` sets the option first. Only the node's own servers get it: nothing
global changes.
"""

from __future__ import annotations

import socket

from node.tls_handshake import HandshakeInThreadServer


class ReusePortAssociationServer(HandshakeInThreadServer):
    """pynetdicom's threaded server, bound with ``SO_REUSEPORT`` (its ``server_bind`` ignores ``allow_reuse_port``)."""

    allow_reuse_port = True

    def server_bind(self) -> None:
        if self.socket is None:
            raise RuntimeError("the association server has no socket to bind")
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

