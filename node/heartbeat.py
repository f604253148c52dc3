"""The node's heartbeat file: which of its service threads are alive, for ``gvr status`` and health checks.

``gvr node`` runs supervised background threads (the assembler, the
reconciler) beside the storage SCP. Nothing outside the process could see
whether they still run, so the node service (``gvr node``, ``gvr demo``)
rewrites ``<data_dir>/health/node.json`` every few seconds (atomically:
temporary file, rename) with the state of each, and a last time with
``stopped`` when it exits. A reader judges it:

* no file: the node never ran with this data folder;
* older than ``STALE_AFTER_S``: the node is gone (killed, host down);
* ``stopped`` or a thread not alive: the node is down, with the thread named.

A file, not an audit row: the audit schema stays as it is, and the data folder
is already shared by every host (the spool).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

INTERVAL_S = 5.0
STALE_AFTER_S = 3 * INTERVAL_S


def heartbeat_path(data_dir: Path) -> Path:
    return data_dir / "health" / "node.json"


def supervised_threads(service: Any) -> dict[str, bool]:
    """Whether each service thread of a NodeService is alive: the SCP and every SupervisedLoop it holds.

    Loops are found as attributes with a ``loop`` (the assembler's, the
    reconciler's), so a loop added to the service later is reported without
    a change here.
    """
    from node.supervision import SupervisedLoop

    threads = {"storage SCP": getattr(service.scp, "_server", None) is not None}
    children = getattr(service, "scp_children", None)  # issue 12: scp_processes > 1
    if children is not None:
        threads.update(children.alive())
    for owner in vars(service).values():
        loop = getattr(owner, "loop", None)
        if isinstance(loop, SupervisedLoop):
            threads[loop.name] = loop.alive
    return threads


class HeartbeatWriter:
    """Rewrites the heartbeat file every ``interval`` seconds in a daemon thread."""

    def __init__(self, path: Path, threads: Callable[[], dict[str, bool]], interval: float = INTERVAL_S) -> None:
        self.path = path
        self.threads = threads
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self, reason: str = "stopped") -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 1)
        self.write(stopped=reason)

    def _run(self) -> None:
        if not self._stop.wait(min(1.0, self.interval)):  # first beat once the service has started
            self.write()
        while not self._stop.wait(self.interval):
            self.write()

    def write(self, stopped: str | None = None) -> None:
        """Write the file atomically; a failure is logged (monitoring never stops the node)."""
        record = {"host": socket.gethostname(), "pid": os.getpid(), "at": time.time(),
                  "threads": self.threads(), "stopped": stopped}  # fmt: skip
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            partial.write_text(json.dumps(record))
            partial.replace(self.path)
        except OSError as error:
            log.warning("could not write the heartbeat %s: %s", self.path, error)


@dataclass(frozen=True)
class NodeHealth:
    """What the heartbeat says: ``problem`` is None when every thread was alive recently."""

    path: str
    age_seconds: float | None = None
    threads: dict[str, bool] | None = None
    problem: str | None = None


def read_heartbeat(path: Path, now: float | None = None) -> NodeHealth:
    """Judge the heartbeat file (see the module docstring)."""
    now = time.time() if now is None else now
    try:
        record = json.loads(path.read_text())
        age = now - float(record["at"])
        threads = {str(k): bool(v) for k, v in dict(record["threads"]).items()}
    except FileNotFoundError:
        return NodeHealth(str(path), problem=f"no heartbeat file {path}: is `gvr node` running with this data_dir?")
    except (OSError, ValueError, KeyError, TypeError) as error:
        return NodeHealth(str(path), problem=f"unreadable heartbeat file {path}: {error}")
    where = f"node {record.get('host')} pid {record.get('pid')}"
    dead = [name for name, alive in threads.items() if not alive]
    if record.get("stopped"):
        problem: str | None = f"{where} stopped {age:.0f} s ago ({record['stopped']})"
    elif age > STALE_AFTER_S:
        problem = f"{where}: no heartbeat for {age:.0f} s (killed, or its host is down?)"
    elif dead:
        problem = f"{where}: service thread(s) not running: {', '.join(dead)}"
    else:
        problem = None
    return NodeHealth(str(path), round(age, 1), threads, problem)
