"""Fixtures for node tests: a node running in this process, on a free port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.config import Settings, load_settings
from node.service import NodeService
from tests.factories import CT_IMAGE, DX_FOR_PRESENTATION
from tests.peers import free_port


@pytest.fixture
def make_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Settings for a node under test; keyword arguments override."""
    for name in list(__import__("os").environ):
        if name.startswith("GVR_"):
            monkeypatch.delenv(name)

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "port": free_port(),
            "bind_address": "127.0.0.1",
            "allowed_calling_aets": ["STORESCU", "GVRSCU", "ORTHANC"],
            "study_stable_seconds": 0.5,
            "assembler_poll_seconds": 0.1,
            "min_free_disk_mb": 0,
        }
        values.update(overrides)
        return load_settings(**values)

    return build


@pytest.fixture
def running_node(make_settings: Any) -> Iterator[Any]:
    """Start NodeService(settings) in-process; stopped at teardown."""
    started: list[NodeService] = []

    def start(**overrides: Any) -> NodeService:
        service = NodeService(make_settings(**overrides))
        service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture
def raw_association(running_node: Any) -> Iterator[tuple[NodeService, Any]]:
    """(node, association) proposing DX and CT on explicit VR little endian, released at teardown."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE

    service = running_node()
    ae = AE(ae_title="GVRSCU")
    for sop_class in (DX_FOR_PRESENTATION, CT_IMAGE):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", service.port, ae_title="GVRNODE")
    assert assoc.is_established
    yield service, assoc
    if assoc.is_established:
        assoc.release()
