"""Fixtures for node tests: a node running in this process, on a free port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.config import Settings, load_settings
from node.service import NodeService
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
