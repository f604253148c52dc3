"""issue 12: more storage SCP processes on the node's port, so concurrent associations use more cores.

``gvr node`` is bound by one interpreter's GIL at about one core. With
``scp_processes`` N above 1 it starts N-1 **SCP processes** (``spawn``: never a
fork of a process with threads and DB connections), each with its own spool
writer, audit DB engine, ``Ingestor`` and ``StorageSCP``, bound to the same
address with ``SO_REUSEPORT`` (``node.reuse_port``); Linux spreads incoming
connections over the N listening sockets. The assembler, reconciler, metrics
server and heartbeat stay in ``gvr node`` (the parent).

Each SCP process tells the parent over a pipe of its own:

* ``("ready", pid)`` once it listens;
* ``("study", association, study_uid)`` the first time an open association sends a study,
  ``("closed", association)`` when it ends: the parent's assembler sees those studies
  as in flight, exactly as it sees its own associations' (``Assembler.in_flight``);
* ``("released", studies)``: a released association delivered them (``Assembler.mark_released``);
* ``("counts", {status: n})`` twice a second: its C-STOREs, for the parent's ``/metrics``.

A process that dies (killed, a crash) is logged and started again by the parent,
which keeps serving meanwhile (restarting the whole node would drop every
association of the other processes); its studies are no longer in flight, so they
complete by ``study_stable_seconds`` as for an association that vanished. A
process exits by itself when its parent is gone, so none keeps the port.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from node.audit.db import AuditDB, actor_name
from node.audit.models import AssociationOutcome
from node.config import Settings
from node.duplicates import SopInstanceLocks
from node.ingest import IngestResult
from node.limits import MB, ResourceLimits
from node.metrics import CountingIngestor
from node.scp import AssociationLog, ReleaseCallback, StorageSCP
from node.spool import Spool, process_owner

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0
RESTART_DELAY_S = 1.0  # after a death; doubled for each death that follows a short life, up to the cap
RESTART_DELAY_MAX_S = 60.0
STEADY_LIFE_S = 60.0  # a process that lived this long died of something new: back to the first delay


def restart_delay(previous: float, lived: float) -> float:
    """Seconds before restarting an SCP process that lived ``lived`` s; ``previous`` is the last delay (0: none).

    A process that cannot serve (its port taken, a broken setting) dies at once every time:
    backing off keeps that from becoming a restart and an error line every second for ever.
    """
    if previous <= 0 or lived >= STEADY_LIFE_S:
        return RESTART_DELAY_S
    return min(previous * 2, RESTART_DELAY_MAX_S)
REPORT_S = 0.5
STOP_TIMEOUT_S = 10.0


def lock_dir(settings: Settings) -> Path:
    """Where the SCP processes' per-SOP-instance lock files lie (``SopInstanceLocks``)."""
    return settings.spool_dir / "locks"


def shared_locks(settings: Settings) -> SopInstanceLocks:
    """The ingest locks of every process of a node with ``scp_processes`` above 1."""
    return SopInstanceLocks(lock_dir=lock_dir(settings))


# -- in an SCP process ---------------------------------------------------------------------


class ParentLink:
    """The SCP process's end of its pipe: sends from any thread; a parent gone is not an error here."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError):
                pass  # the parent is gone: the main loop sees it and stops


class ReportingAssociationLog(AssociationLog):
    """``AssociationLog`` that also tells the parent which studies its open associations send."""

    def __init__(self, audit: AuditDB, actor: str, link: ParentLink) -> None:
        super().__init__(audit, actor)
        self.link = link

    def note_study(self, assoc: Any, study_uid: str) -> bool:
        new = super().note_study(assoc, study_uid)
        if new:
            self.link.send(("study", id(assoc), study_uid))
        return new

    def close(self, assoc: Any, outcome: AssociationOutcome) -> set[str]:
        studies = super().close(assoc, outcome)
        self.link.send(("closed", id(assoc)))
        return studies


class StoreTally:
    """An SCP process's C-STORE answers by status, taken by the main loop and sent to the parent."""

    def __init__(self) -> None:
        self._counts: Counter[int] = Counter()
        self._lock = threading.Lock()

    def count_store(self, result: IngestResult) -> None:
        with self._lock:
            self._counts[int(result.status)] += 1

    def take(self) -> dict[int, int]:
        with self._lock:
            counts, self._counts = dict(self._counts), Counter()
        return counts


def scp_process_main(settings: Settings, index: int, conn: Connection, parent_pid: int) -> None:
    """An SCP process: serve until SIGTERM (from the parent) or until the parent is gone."""
    from node.cli.common import setup_logging

    setup_logging()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # the parent's stop()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides and stops us
    link = ParentLink(conn)
    audit = AuditDB(settings.audit_url)
    spool = Spool(settings.spool_dir, settings.min_free_disk_mb * MB, owner=process_owner(f"node-scp{index}"))
    spool.clear_partial_writes()
    actor = actor_name(f"scp{index}")
    tally = StoreTally()
    ingestor = CountingIngestor(spool, audit, actor, tally, ResourceLimits.from_settings(settings),
                                shared_locks(settings))  # fmt: skip
    scp = StorageSCP(settings, ingestor, ReportingAssociationLog(audit, actor, link),
                     on_release=lambda studies: link.send(("released", sorted(studies))))  # fmt: skip
    scp.start()
    link.send(("ready", os.getpid()))
    try:
        while not stop.wait(REPORT_S):
            if os.getppid() != parent_pid:
                log.warning("SCP process %d: gvr node (pid %d) is gone; stopping", index, parent_pid)
                break
            counts = tally.take()
            if counts:
                link.send(("counts", counts))
    finally:
        scp.stop()
        counts = tally.take()
        if counts:
            link.send(("counts", counts))
        audit.dispose()


# -- in gvr node ---------------------------------------------------------------------------


@dataclass
class _Child:
    """One SCP process as the parent sees it."""

    index: int
    process: BaseProcess | None = None
    conn: Connection | None = None
    ready: bool = False
    sending: dict[int, set[str]] = field(default_factory=dict)  # open association -> studies it sent
    start_after: float = 0.0  # monotonic time of the next start, after a death
    started_at: float = 0.0  # monotonic time of the last start
    delay: float = 0.0  # the last restart delay (restart_delay)


class ScpProcesses:
    """The N-1 SCP processes of ``gvr node`` and the thread that hears from them and restarts them."""

    def __init__(
        self, settings: Settings, on_release: ReleaseCallback, count_stores: Callable[[dict[int, int]], None]
    ) -> None:
        self.settings = settings
        self.on_release = on_release
        self.count_stores = count_stores
        self.children = [_Child(index) for index in range(1, settings.scp_processes)]
        self.restarts = 0
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._port = 0

    def start(self, port: int) -> None:
        """Start every SCP process on ``port`` (the one the parent bound) and wait until each listens."""
        self._port = port
        for child in self.children:
            self._spawn(child)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(child.ready for child in self.children):
            if time.monotonic() > deadline or any(not c.ready and not self._alive(c) for c in self.children):
                self.stop()
                raise RuntimeError(f"the SCP processes did not all start listening on port {port} (see the log)")
            self._serve_once(0.1, restart=False)
        log.info("%d SCP process(es) listening beside gvr node on port %d", len(self.children), port)
        self._thread = threading.Thread(target=self._run, name="scp-processes", daemon=True)
        self._thread.start()

    def in_flight(self) -> set[str]:
        """Studies an open association of an SCP process has sent instances for."""
        with self._lock:
            return {study for child in self.children for studies in child.sending.values() for study in studies}

    def alive(self) -> dict[str, bool]:
        """For the heartbeat: whether each SCP process runs."""
        return {f"storage SCP process {child.index}": self._alive(child) for child in self.children}

    def pids(self) -> list[int]:
        return [child.process.pid for child in self.children if child.process is not None and child.process.pid]

    def stop(self) -> None:
        """SIGTERM every SCP process, wait for it (then SIGKILL), and stop listening to them."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(STOP_TIMEOUT_S)
        for child in self.children:
            if child.process is not None and child.process.is_alive():
                child.process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child in self.children:
            if child.process is None:
                continue
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                log.error("SCP process %d (pid %s) did not stop: killed", child.index, child.process.pid)
                child.process.kill()
                child.process.join(5)
            self._drain(child)

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._serve_once(REPORT_S, restart=True)
            except Exception:  # this thread must outlive a bad message; the next pass goes on
                log.exception("SCP processes: a pass failed")
                time.sleep(REPORT_S)

    def _serve_once(self, timeout: float, restart: bool) -> None:
        waitables: dict[Any, _Child] = {}
        for child in self.children:
            if child.conn is not None:
                waitables[child.conn] = child
            if child.process is not None:
                waitables[child.process.sentinel] = child
        for ready in wait(list(waitables), timeout):
            child = waitables[ready]
            if ready is child.conn:
                self._drain(child)
            elif child.process is not None and not child.process.is_alive():
                self._on_death(child)
        if restart:
            now = time.monotonic()
            for child in self.children:
                if child.process is None and now >= child.start_after:
                    self._spawn(child)
                    self.restarts += 1

    def _spawn(self, child: _Child) -> None:
        receive, send = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=scp_process_main,
            args=(self.settings.model_copy(update={"port": self._port}), child.index, send, os.getpid()),
            name=f"gvr-node-scp{child.index}",
            daemon=True,
        )
        process.start()
        send.close()  # the parent keeps only its reading end: EOF once the process is gone
        child.process, child.conn, child.ready = process, receive, False
        child.started_at = time.monotonic()

    def _drain(self, child: _Child) -> None:
        """Handle every message waiting on ``child``'s pipe."""
        conn = child.conn
        try:
            while conn is not None and conn.poll():
                self._handle(child, conn.recv())
        except (EOFError, OSError):
            child.conn = None  # closed: the sentinel says the process ended
            if conn is not None:
                conn.close()

    def _handle(self, child: _Child, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "study":
            with self._lock:
                child.sending.setdefault(message[1], set()).add(message[2])
        elif kind == "closed":
            with self._lock:
                child.sending.pop(message[1], None)
        elif kind == "released":
            self.on_release(set(message[1]))
        elif kind == "counts":
            self.count_stores(message[1])
        elif kind == "ready":
            child.ready = True
            log.info("SCP process %d (pid %d) listening", child.index, message[1])

    def _on_death(self, child: _Child) -> None:
        self._drain(child)  # what it said before it ended still counts (a release)
        assert child.process is not None
        code, pid = child.process.exitcode, child.process.pid
        now = time.monotonic()
        child.delay = restart_delay(child.delay, now - child.started_at)
        child.start_after = now + child.delay
        log.error("SCP process %d (pid %s) ended with exit code %s; its open associations are gone, "
                  "their studies complete after study_stable_seconds; restarting it in %.0f s", child.index,
                  pid, code, child.delay)  # fmt: skip
        child.process.close()
        with self._lock:
            child.sending.clear()
        if child.conn is not None:
            child.conn.close()
        child.process, child.conn, child.ready = None, None, False

    @staticmethod
    def _alive(child: _Child) -> bool:
        return child.process is not None and child.process.is_alive()
