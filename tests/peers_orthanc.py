"""Orthanc, the PACS in tests: a private instance with its own config, folders and free ports."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.peers import (
    LOOPBACK,
    direct_opener,
    free_port,
    nodelay_env,
    require_tool,
    start_process,
    wait_for_http,
)

# -- Orthanc (the PACS in tests) -----------------------------------------------------------------


class Orthanc:
    """A private Orthanc: own config and storage under ``root``, free DICOM and HTTP ports.

    Never ``/etc/orthanc`` (Debian merges every JSON there). Talks REST with
    urllib. ``start()`` skips when Orthanc is not installed.
    """

    def __init__(self, root: Path, aet: str = "ORTHANC") -> None:
        self.root = root
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.url = f"http://{LOOPBACK}:{self.http_port}"
        self.log = root / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._opener = direct_opener()

    def config(self) -> dict[str, Any]:
        return {
            "Name": f"gvr-test-{self.aet}",
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "storage"),
            "DicomAlwaysAllowStore": True,
            "StableAge": 5,
            "DicomModalities": {},
            "SaveJobs": False,
        }

    def start(self, timeout: float = 30.0) -> Orthanc:
        binary = require_tool("Orthanc", "orthanc")
        self.root.mkdir(parents=True, exist_ok=True)
        config_path = self.root / "config.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        self.process = start_process([binary, str(config_path)], self.log, env=nodelay_env())
        wait_for_http(f"{self.url}/system", timeout, process=self.process, log=self.log)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ask Orthanc to shut down, wait for the PID (its index stays locked until then), kill after."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.request("POST", "/tools/shutdown", b"")
        except (urllib.error.URLError, OSError):
            self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)

    def request(self, method: str, path: str, body: bytes | dict[str, Any] | None = None) -> Any:
        """One REST call; JSON bodies are encoded, JSON answers decoded (else the raw bytes)."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with self._opener.open(request, timeout=60) as response:
            payload = response.read()
            if "json" in response.headers.get("Content-Type", ""):
                return json.loads(payload) if payload else None
            return payload

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare a DICOM peer at run time (``PUT /modalities/<name>``)."""
        self.request("PUT", f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def upload(self, path: Path) -> dict[str, Any]:
        """Store a DICOM file through REST; Orthanc's answer holds ``ID`` and ``ParentStudy``."""
        answer: dict[str, Any] = self.request("POST", "/instances", path.read_bytes())
        return answer

    def store_to(self, modality: str, resource_ids: Sequence[str]) -> dict[str, Any]:
        """C-STORE resources to a declared modality, waiting for the transfer to finish."""
        body = {"Resources": list(resource_ids), "Synchronous": True}
        answer: dict[str, Any] = self.request("POST", f"/modalities/{modality}/store", body)
        return answer

    def find_instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        return list(self.request("GET", "/instances"))

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """An instance's tags by keyword (``simplified-tags``)."""
        return dict(self.request("GET", f"/instances/{instance_id}/simplified-tags"))

    def studies(self) -> list[str]:
        """Orthanc ids of every study."""
        return list(self.request("GET", "/studies"))
