"""Supervised background loops: any error in a pass is logged and survived; a dead thread ends the node.

Fault injection: passes that raise RuntimeError, MemoryError and SQLAlchemy
errors, an assembler whose study query fails inside a running node (fed by
dcmtk's storescu), and a real ``gvr node`` process whose assembler thread dies.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy.exc import OperationalError

from node.audit.models import StudyState
from node.supervision import SupervisedLoop, describe_error
from tests.factories import make_image, write
from tests.node.test_assembler import _wait_for_study
from tests.peers import LOOPBACK, free_port, require_tool

SECRET = "DOE^JANE"  # stands for a value an error message might quote


def _faults() -> list[BaseException]:
    return [RuntimeError(SECRET), MemoryError(SECRET), OperationalError(SECRET, {}, Exception(SECRET))]


def test_loop_survives_any_exception_and_logs_without_the_message(caplog: pytest.LogCaptureFixture) -> None:
    """RuntimeError, MemoryError, an audit DB error: each pass fails, the loop runs on, the log names the type."""
    faults = _faults()
    passes: list[int] = []
    done = threading.Event()

    def body() -> None:
        passes.append(1)
        if faults:
            raise faults.pop(0)
        done.set()

    caplog.set_level(logging.ERROR, logger="node.supervision")
    loop = SupervisedLoop("test-loop", body, 0.01)
    loop.start()
    try:
        assert done.wait(5), "the loop stopped after a failed pass"
        assert loop.alive and loop.failed_passes == 3 and loop.death is None
    finally:
        loop.stop()
    assert not loop.alive
    for name in ("RuntimeError", "MemoryError", "OperationalError"):
        assert name in caplog.text
    assert SECRET not in caplog.text


class Fatal(BaseException):
    """Not an Exception: what the supervisor cannot survive."""


def test_loop_death_is_reported() -> None:
    """A BaseException ends the thread and calls on_death with the loop's name."""
    died: list[str] = []
    event = threading.Event()

    def body() -> None:
        raise Fatal(SECRET)

    loop = SupervisedLoop("dying", body, 0.01, lambda name, error: (died.append(name), event.set()))
    loop.start()
    assert event.wait(5) and died == ["dying"] and isinstance(loop.death, Fatal)
    time.sleep(0.05)
    assert not loop.alive
    assert "Fatal at" in describe_error(loop.death)


def test_assembler_survives_a_failing_pass_in_a_running_node(
    running_node: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two passes fail (MemoryError, RuntimeError); a study sent by storescu is assembled all the same."""
    storescu = require_tool("storescu", "dcmtk")
    service = running_node()
    service.assembler.enqueue = lambda job: None
    original = service.assembler._complete_studies
    faults: list[BaseException] = [MemoryError(SECRET), RuntimeError(SECRET)]

    def flaky() -> list[int]:
        if faults:
            raise faults.pop(0)
        return original()

    monkeypatch.setattr(service.assembler, "_complete_studies", flaky)
    study_uid = generate_uid()
    path = write(make_image(study_uid), tmp_path)
    subprocess.run([storescu, "-aet", "STORESCU", "-aec", "GVRNODE", LOOPBACK, str(service.port), str(path)],
                   check=True, timeout=30, env={**os.environ, "TCP_NODELAY": "1"})  # fmt: skip
    assert _wait_for_study(service, study_uid, timeout=20).state == StudyState.ASSEMBLED
    assert not faults and service.assembler.loop.alive and service.assembler.loop.failed_passes >= 2


DYING_NODE = """
import sys
import node.assembler as assembler

class Fatal(BaseException):
    pass

def run_once(self):
    raise Fatal("assembler killed by the test")

assembler.Assembler.run_once = run_once
from node.cli.node_cmd import main
sys.exit(main([]))
"""


def test_node_process_exits_non_zero_when_its_assembler_dies(tmp_path: Path) -> None:
    """A real ``gvr node`` whose assembler thread dies stops within seconds with exit status 3."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GVR_")}
    env.update(GVR_DATA_DIR=str(tmp_path / "data"), GVR_PORT=str(free_port()), OMP_NUM_THREADS="1")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", DYING_NODE], env=env, capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip
    assert done.returncode == 3, done.stderr[-2000:]
    assert "assembler thread died (Fatal" in done.stderr and "exiting 3" in done.stderr
    assert time.monotonic() - started < 30
