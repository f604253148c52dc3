"""What each receiver flushes to disk per instance, counted by ``strace`` rather than read in its docs.

A receiver's speed on one association is bounded by the flushes it waits for before
it answers, and what it flushes is what its acknowledgement promises. So beside the
timed runs, ``benchmarks.ingest`` sends a few instances to each receiver once more
with ``strace -f -y`` attached to the receiver's processes (all their threads) and counts
the flush calls by the kind of file they name: the stored instance, a folder (a new
directory entry), or the index / audit database.

Measured this way (2026-11-30, Debian's Orthanc 1.10.1): Orthanc ``fdatasync``s each
stored file and nothing else per instance; its SQLite index runs in WAL mode with
``synchronous=NORMAL``, so an index commit is not flushed (it survives Orthanc being
killed, not a power cut). The node flushes the file, its study folder and the audit
commit. Not timed: strace slows every call it sees.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from benchmarks.ingest_receivers import Receiver, nodelay_env, tree_pids
from tests.peers_dcmtk import dcmtk_tool

FLUSH_CALLS = ("fsync", "fdatasync", "sync_file_range", "syncfs", "msync")
KINDS = ("instance file", "folder", "index / audit DB")
SEND_TIMEOUT_S = 300.0
_CALL = re.compile(r"^\d+\s+(?P<call>\w+)\((?P<fd>\d+)<(?P<path>[^>]*)>")
_DATABASE = re.compile(r"(\.sqlite3?|\.db|/index)(-wal|-journal|-shm)?$")


@dataclass(frozen=True)
class Flushes:
    """Flush calls per instance of one receiver, by the kind of file they named."""

    receiver: str
    instances: int
    by_kind: dict[str, int]

    @property
    def per_instance(self) -> float:
        return sum(self.by_kind.values()) / self.instances

    def describe(self) -> str:
        parts = ", ".join(f"{self.by_kind.get(kind, 0) / self.instances:.1f} {kind}" for kind in KINDS)
        return f"{self.receiver}: {self.per_instance:.1f} flush calls per instance ({parts})"


def strace_installed() -> bool:
    return shutil.which("strace") is not None


def count_flushes(files: list[Path], receiver: Receiver, work: Path) -> Flushes:
    """Send ``files`` over one association with strace on the receiver; count its flush calls by kind."""
    trace = work / "strace.txt"
    with receiver.serve(work) as listening:
        tracer = subprocess.Popen(
            ["strace", "-f", "-y", "-e", f"trace={','.join(FLUSH_CALLS)}", "-o", str(trace),
             *(arg for pid in tree_pids(listening.pid) for arg in ("-p", str(pid)))],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            _wait_attached(tracer)
            sent = subprocess.run(
                [dcmtk_tool("storescu"), "-aec", listening.aet, "127.0.0.1", str(listening.port), *map(str, files)],
                env=nodelay_env(), capture_output=True, timeout=SEND_TIMEOUT_S, check=False,
            )  # fmt: skip
        finally:
            tracer.send_signal(signal.SIGINT)  # detach; the receiver goes on
            tracer.wait(timeout=30)
    if sent.returncode != 0:
        raise RuntimeError(f"storescu failed sending to {receiver.name}: {sent.stderr.decode(errors='replace')[-1000:]}")
    receiver.check(work, len(files))
    return Flushes(receiver.name, len(files), classify(trace.read_text(errors="replace").splitlines()))


def _wait_attached(tracer: subprocess.Popen[bytes]) -> None:
    """strace says 'Process N attached' on stderr once per thread; the first line is enough to start."""
    assert tracer.stderr is not None
    line = tracer.stderr.readline().decode(errors="replace")  # or its error, as it exits
    if "attached" not in line:
        raise RuntimeError(f"strace did not attach: {line.strip() or 'no output'} (ptrace allowed here?)")
    time.sleep(0.5)  # the other threads' attach lines follow within milliseconds


def classify(lines: list[str]) -> dict[str, int]:
    """Flush calls by kind of file, from ``strace -f -y`` lines (``PID call(FD</path>) = 0``)."""
    kinds: Counter[str] = Counter()
    for line in lines:
        match = _CALL.match(line)
        if match is None or match["call"] not in FLUSH_CALLS:
            continue
        path = match["path"].removesuffix(" (deleted)")
        if _DATABASE.search(path):
            kinds["index / audit DB"] += 1
        elif Path(path).is_dir():
            kinds["folder"] += 1
        else:
            kinds["instance file"] += 1
    return dict(kinds)
