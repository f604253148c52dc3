"""Spool ownership: a process starting up cleans only its own temporary files and those of dead processes.

Issue 10: the node emptied all of ``spool/tmp`` at start-up, including a delivery
worker's half-built results, and that delivery failed 17 ms later. Each process
now writes in ``spool/tmp/<owner>``; cleaning touches its own folder and the
folders of processes of this host that no longer run. A live process's files,
and another host's (a shared spool), are left alone.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.spool import Spool, process_owner
from tests.peers import LOOPBACK, free_port, start_process, stop_process, wait_for_port

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def live_pid() -> Iterator[int]:
    """A process that runs for the whole test (a worker, as far as the spool can tell)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait(10)


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(10)
    return process.pid  # reaped: no process has this pid now (reuse within the test is very unlikely)


def _partial(root: Path, owner: str) -> Path:
    folder = root / "tmp" / owner
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "result.part"
    path.write_bytes(b"half a result object")
    return path


def test_clear_partial_writes_keeps_live_and_foreign_owners(tmp_path: Path, live_pid: int) -> None:
    """The node's cleanup removes its own and a dead worker's partial files, never a live worker's or
    another host's."""
    host = socket.gethostname()
    root = tmp_path / "spool"
    node = Spool(root, owner="node")
    own = _partial(root, "node")
    live = _partial(root, f"worker-{host}-{live_pid}")
    dead = _partial(root, f"worker-{host}-{_dead_pid()}")
    elsewhere = _partial(root, "worker-another-host-4242")
    assert node.clear_partial_writes() == 2
    assert not own.exists() and not dead.exists() and not dead.parent.exists()
    assert live.read_bytes() == b"half a result object" and elsewhere.exists()
    worker = Spool(root, owner=process_owner("worker"))  # this test process: a live worker of this host
    mine = _partial(root, worker.owner)
    assert worker.clear_partial_writes() == 1 and not mine.exists()  # its own leftovers only
    assert live.exists() and elsewhere.exists() and node.tmp.is_dir()


def test_gvr_node_restart_keeps_a_live_workers_partial_files(tmp_path: Path, live_pid: int) -> None:
    """A real ``gvr node`` started twice over a spool where a live worker is building results: its file stays."""
    host = socket.gethostname()
    data = tmp_path / "data"
    live = _partial(data / "spool", f"worker-{host}-{live_pid}")
    dead = _partial(data / "spool", f"worker-{host}-{_dead_pid()}")
    left_by_node = _partial(data / "spool", "node")
    port = free_port()
    env = {"GVR_DATA_DIR": str(data), "GVR_PORT": str(port), "GVR_MIN_FREE_DISK_MB": "0", "PATH": "/usr/bin:/bin"}
    for run in (1, 2):
        log = tmp_path / f"gvr-node-{run}.log"
        node = start_process([sys.executable, "-m", "node.cli.main", "node"], log, env, cwd=REPO_ROOT)
        try:
            wait_for_port(LOOPBACK, port, 30, process=node, log=log)
            assert live.read_bytes() == b"half a result object"
            assert not dead.exists() and not left_by_node.exists()
        finally:
            if run == 1:
                node.kill()  # the first life ends in a crash
                node.wait(10)
            else:
                stop_process(node)
