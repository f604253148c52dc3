"""A receiving PACS for the demo: Orthanc when installed, else a small built-in storage SCP."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Protocol

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import Peer
from node.scp import set_nodelay


class DemoPacs(Protocol):
    name: str
    peer: Peer

    def received_sop_uids(self) -> set[str]: ...

    def has_report(self, study_uid: str) -> bool: ...

    def stop(self) -> None: ...


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout} s")


class OrthancPacs:
    """Orthanc with its own config and storage under the demo folder."""

    name = "Orthanc"

    def __init__(self, folder: Path, node_peer: Peer, detached: bool = False) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.peer = Peer(ae_title="ORTHANC", host="127.0.0.1", port=free_port())
        self.url = f"http://127.0.0.1:{self.http_port}"
        config = {
            "Name": "gvr-demo", "DicomAet": "ORTHANC", "DicomPort": self.peer.port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "StorageDirectory": "storage",
            "IndexDirectory": "storage", "DicomAlwaysAllowStore": True, "StableAge": 5,
            "DicomModalities": {"gvr": [node_peer.ae_title, node_peer.host, node_peer.port]},
        }  # fmt: skip
        (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
        log = (folder / "orthanc.log").open("wb")
        env = dict(os.environ, TCP_NODELAY="1")
        self.process = subprocess.Popen(  # detached: its own session, so it outlives the demo (--keep)
            ["Orthanc", str(folder / "orthanc.json")], stdout=log, stderr=log, env=env, cwd=folder,
            start_new_session=detached,
        )
        _wait_for(self._answers, 30, "Orthanc")

    def _answers(self) -> bool:
        try:
            return self.request("GET", "/system") is not None
        except OSError:
            return False

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """REST call; ``body`` is sent as JSON, or as is when it is bytes."""
        data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def received_sop_uids(self) -> set[str]:
        uids = set()
        for instance_id in self.request("GET", "/instances"):
            tags = self.request("GET", f"/instances/{instance_id}/simplified-tags")
            uids.add(tags.get("SOPInstanceUID", ""))
        return uids

    def upload(self, path: Path) -> dict[str, Any]:
        """POST /instances: store a file in Orthanc as if a modality had sent it."""
        answer: dict[str, Any] = self.request("POST", "/instances", path.read_bytes())
        return answer

    def study_id(self, study_uid: str) -> str:
        """Orthanc's identifier of a study, by StudyInstanceUID."""
        matches = self.request("POST", "/tools/lookup", study_uid.encode())
        ids = [match["ID"] for match in matches if match["Type"] == "Study"]
        if not ids:
            raise LookupError(f"Orthanc holds no study {study_uid}")
        return str(ids[0])

    def has_report(self, study_uid: str) -> bool:
        """Is a Structured Report stored in this study yet?"""
        query = {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}}
        return bool(self.request("POST", "/tools/find", query))

    def stop(self) -> None:
        try:
            self.request("POST", "/tools/shutdown")
            self.process.wait(15)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait(5)


class BuiltinPacs:
    """A minimal storage SCP that files what it receives: enough to show delivery works."""

    name = "built-in receiver"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._received: set[str] = set()
        self._reports: set[str] = set()
        ae = AE(ae_title="DEMOPACS")
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        ae.maximum_pdu_size = 0
        port = free_port()
        server = ae.start_server(
            ("127.0.0.1", port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_C_ECHO, lambda event: 0x0000),
                          (evt.EVT_CONN_OPEN, lambda event: set_nodelay(event.assoc.dul.socket.socket))],
        )  # fmt: skip
        assert server is not None  # non-blocking start_server always returns the server
        self.server = server
        self.peer = Peer(ae_title="DEMOPACS", host="127.0.0.1", port=port)

    def _store(self, event: Any) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        (self.folder / f"{uid}.dcm").write_bytes(event.encoded_dataset())
        self._received.add(uid)
        if str(event.request.AffectedSOPClassUID).startswith("1.2.840.10008.5.1.4.1.1.88."):
            self._reports.add(str(event.dataset.StudyInstanceUID))
        return 0x0000

    def has_report(self, study_uid: str) -> bool:
        return study_uid in self._reports

    def received_sop_uids(self) -> set[str]:
        return set(self._received)

    def stop(self) -> None:
        self.server.shutdown()


def start_pacs(folder: Path, node_peer: Peer, detached: bool = False) -> DemoPacs:
    """Orthanc when it is installed (a real PACS), else the built-in receiver (which lives in this process)."""
    if shutil.which("Orthanc"):
        return OrthancPacs(folder / "orthanc", node_peer, detached)
    return BuiltinPacs(folder / "pacs")
