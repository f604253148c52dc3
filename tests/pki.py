"""A test PKI from the ``openssl`` CLI, for the SCP's TLS and mutual TLS tests.

A test CA, the node's server certificate (SAN IP 127.0.0.1), a client certificate
from the same CA, and a client certificate from a second, untrusted CA (rogue).
"""

from __future__ import annotations

import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.peers import require_tool


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path

    def server_env(self) -> dict[str, str]:
        """The node's settings for mutual TLS with this PKI (tls_cert, tls_key, tls_ca)."""
        return {"GVR_TLS_CERT": str(self.server_cert), "GVR_TLS_KEY": str(self.server_key),
                "GVR_TLS_CA": str(self.ca)}  # fmt: skip

    def client_context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        """A client context trusting the test CA, showing ``cert`` (none when ``None``)."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
        if cert is not None and key is not None:
            context.load_cert_chain(str(cert), str(key))
        return context


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(folder: Path, name: str, subject: str, ca: str, extensions: str) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=folder)  # fmt: skip
    (folder / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)  # fmt: skip


def make_pki(folder: Path, client_cn: str) -> Pki:
    """Write the test PKI into ``folder``; skips the test when ``openssl`` is missing."""
    require_tool("openssl", "openssl")
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN=gvr test {ca}",
                 cwd=folder)  # fmt: skip
    _issue(folder, "server", "/CN=127.0.0.1", "ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _issue(folder, "client", f"/CN={client_cn}", "ca", "extendedKeyUsage=clientAuth\n")
    _issue(folder, "rogue", f"/CN={client_cn}", "rogue-ca", "extendedKeyUsage=clientAuth\n")
    return Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "client.pem",
               folder / "client.key", folder / "rogue.pem", folder / "rogue.key")  # fmt: skip
