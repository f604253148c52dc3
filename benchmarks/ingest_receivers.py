"""The receivers ``benchmarks.ingest`` compares: the node (SQLite or PostgreSQL audit DB), Orthanc, dcmtk storescp.

Each is started fresh for one timed send, on free ports with a data folder of its
own, and stopped after; ``check`` then says whether it kept every instance. CPU is
read from ``/proc`` for the receiver's whole process tree.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import create_engine, text

from tests.peers_dcmtk import dcmtk_tool
from tests.peers_orthanc import Orthanc
from tests.peers_servers import PostgresServer

READY_TIMEOUT_S = 60.0
NODE_AET = "GVRNODE"
STORESCP_AET = "STORESCP"
ORTHANC_AET = "ORTHANC"


@dataclass(frozen=True)
class Listening:
    """A started receiver: where to send, and the process whose tree does the work."""

    aet: str
    port: int
    pid: int


class Receiver(Protocol):
    name: str

    def serve(self, work: Path) -> Any:
        """A context manager yielding ``Listening``; the receiver stops when it exits."""

    def check(self, work: Path, count: int) -> None:
        """Raise ``RuntimeError`` unless exactly ``count`` instances were kept (after ``serve`` ended)."""


# -- processes ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its live descendants, from /proc (e.g. the node and its SCP processes)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        if current in found:
            continue
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                pending.extend(int(child) for child in task.read_text().split())
            except OSError:
                continue
    return found


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its live descendants (and children it has reaped), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for current in tree_pids(pid):
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(value) for value in fields[11:15]) / tick  # utime, stime, cutime, cstime
    return total


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll connect until the receiver listens; fail early if it died."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"receiver exited with {process.returncode} before listening:\n{tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)  # a poll interval, not a guess at readiness
    raise RuntimeError(f"nothing listened on port {port} within {READY_TIMEOUT_S} s:\n{tail(log)}")


def tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextmanager
def running(
    command: list[str], env: dict[str, str], port: int, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a receiver, wait until it listens, and stop it (SIGTERM, then SIGKILL) after."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, process, log)
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


SCP_PROCESSES_READY = "SCP process(es) listening beside gvr node"  # node.scp_processes logs it once all listen
READY_TIMEOUT_S = 120.0


def wait_for_log(log: Path, line: str, process: subprocess.Popen[bytes]) -> None:
    """Wait until ``log`` holds ``line``; fail if ``process`` ends or it takes over ``READY_TIMEOUT_S``."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while line not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"receiver never logged {line!r}; see {log}")
        time.sleep(0.05)


def nodelay_env() -> dict[str, str]:
    """dcmtk and Orthanc lose ~40 ms per exchange to Nagle's algorithm on loopback without it."""
    return {**os.environ, "TCP_NODELAY": "1"}


# -- the node ---------------------------------------------------------------------------


def node_command() -> list[str]:
    gvr = Path(sys.executable).with_name("gvr")
    return [str(gvr), "node"] if gvr.exists() else [sys.executable, "-m", "node.cli.main", "node"]


class NodeReceiver:
    """``gvr node`` with its defaults: the embedded SQLite audit DB, or PostgreSQL with ``postgres``.

    With PostgreSQL each run gets a database of its own (``gvr_test_<hex>``), dropped after it.
    """

    def __init__(self, name: str, postgres: PostgresServer | None = None, scp_processes: int = 1) -> None:
        self.name = name
        self.postgres = postgres
        self.scp_processes = scp_processes  # issue 12: GVR_SCP_PROCESSES (opt-in; 1 is the default)
        self._kept: tuple[dict[str, int], int] = ({}, 0)

    @contextmanager
    def serve(self, work: Path) -> Iterator[Listening]:
        port, data = free_port(), work / "node-data"
        database = self.postgres.create_database() if self.postgres is not None else None
        url = self.postgres.url(database) if self.postgres is not None and database is not None else None
        inherited = {key: value for key, value in os.environ.items() if not key.startswith("GVR_")}
        env = {  # the defaults, whatever the caller's shell sets
            **inherited,
            "GVR_DATA_DIR": str(data),
            "GVR_PORT": str(port),
            "GVR_BIND_ADDRESS": "127.0.0.1",
            "GVR_AE_TITLE": NODE_AET,
            "GVR_STUDY_STABLE_SECONDS": "3600",  # ingest only: no jobs queued while we measure
            "GVR_SCP_PROCESSES": str(self.scp_processes),
            **({"GVR_DATABASE_URL": url} if url else {}),
        }
        try:
            with running(node_command(), env, port, work / "node.log") as node:
                if self.scp_processes > 1:  # the parent listens first; measure once every SCP process does
                    wait_for_log(work / "node.log", SCP_PROCESSES_READY, node)
                yield Listening(NODE_AET, port, node.pid)
            self._kept = (_statuses(url or f"sqlite:///{data / 'audit.sqlite3'}"), _files(data))
        finally:
            if self.postgres is not None and database is not None:
                self.postgres.drop_database(database)

    def check(self, work: Path, count: int) -> None:
        statuses, files = self._kept
        if statuses != {"accepted": count} or files != count:
            raise RuntimeError(f"node kept {files} files, audit rows {statuses}; expected {count} accepted")


def _statuses(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("select status, count(*) from instances group by status")).all()
    finally:
        engine.dispose()
    return {str(status).lower(): int(number) for status, number in rows}


def _files(data: Path) -> int:
    return sum(1 for _ in (data / "spool" / "incoming").rglob("*.dcm"))


# -- Orthanc ----------------------------------------------------------------------------


class BenchOrthanc(Orthanc):
    """The tests' private Orthanc, without plugins and without stable-study processing while we measure."""

    def config(self) -> dict[str, Any]:
        return {**super().config(), "Plugins": [], "StableAge": 3600}


class OrthancReceiver:
    """Debian's Orthanc with a config of our own, storage and index in the run's folder."""

    name = "Orthanc"

    def __init__(self) -> None:
        self._indexed = -1

    @contextmanager
    def serve(self, work: Path) -> Iterator[Listening]:
        orthanc = BenchOrthanc(work / "orthanc", aet=ORTHANC_AET).start()
        assert orthanc.process is not None
        try:
            yield Listening(ORTHANC_AET, orthanc.dicom_port, orthanc.process.pid)
            self._indexed = int(orthanc.request("GET", "/statistics")["CountInstances"])
        finally:
            orthanc.stop(timeout=30)

    def check(self, work: Path, count: int) -> None:
        if self._indexed != count:
            raise RuntimeError(f"Orthanc indexed {self._indexed} instances; expected {count}")


def orthanc_installed() -> bool:
    return shutil.which("Orthanc") is not None


# -- dcmtk storescp ---------------------------------------------------------------------


class StorescpReceiver:
    """dcmtk ``storescp`` writing each instance to a folder (no fsync, no index)."""

    name = "storescp"

    @contextmanager
    def serve(self, work: Path) -> Iterator[Listening]:
        out, port = work / "storescp-data", free_port()
        out.mkdir()
        command = [dcmtk_tool("storescp"), "-od", str(out), "-aet", STORESCP_AET, str(port)]
        with running(command, nodelay_env(), port, work / "storescp.log") as storescp:
            yield Listening(STORESCP_AET, port, storescp.pid)

    def check(self, work: Path, count: int) -> None:
        files = sum(1 for _ in (work / "storescp-data").iterdir())
        if files != count:
            raise RuntimeError(f"storescp wrote {files} files; expected {count}")
