"""issue 12: a pynetdicom AE whose storage server binds with ``SO_REUSEPORT``.

With ``scp_processes`` above 1, ``gvr node`` and its SCP processes listen on one
address; Linux spreads the incoming connections over them. pynetdicom's
``start_server`` builds a ``ThreadedAssociationServer`` (a ``socketserver.TCPServer``);
this AE substitutes a subclass whose ``server_bind`` sets the option first. Only
the node's own servers get it: nothing global changes.
"""

from __future__ import annotations

import socket
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer


class ReusePortAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, bound with ``SO_REUSEPORT`` (its ``server_bind`` ignores ``allow_reuse_port``)."""

    allow_reuse_port = True

    def server_bind(self) -> None:
        if self.socket is None:
            raise RuntimeError("the association server has no socket to bind")
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class ReusePortAE(AE):
    """An AE whose non-blocking server (``start_server(block=False)``) shares its port with other processes."""

    def make_server(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("server_class") is ThreadedAssociationServer:
            kwargs["server_class"] = ReusePortAssociationServer
        return super().make_server(*args, **kwargs)
