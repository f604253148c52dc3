"""One truth for a SOP Instance UID: copies are written one at a time, and a different copy is a conflict.

issue 9: eight associations sending one SOP Instance UID at once all took the
"file without its audit row" path before the first writer committed, so the file
kept was not always the one the accepted row's sha256 describes. The ingestor now
holds a lock per SOP Instance UID from the spool write to the audit commit. A later
copy with the same bytes is a plain duplicate; one with other bytes, or the same
instance in a second study, is a **conflict**: the first acknowledged copy stays
(results may already derive from it), the other goes to ``<spool>/quarantine/``
and gets an ``instance.conflict`` event with both hashes.
"""

from __future__ import annotations

import fcntl
import os
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from node.spool import uid_to_filename

_STRIPES = 256


class SopInstanceLocks:
    """Striped locks keyed by SOP Instance UID: bounded memory, and copies of one UID never overlap.

    Guards one node process; with ``lock_dir`` (issue 12: ``scp_processes`` above 1) each
    stripe is also an ``fcntl.flock`` on ``<lock_dir>/<stripe>.lock``, so the SCP processes
    sharing a spool serialise the same section. The audit DB's unique index on accepted SOP
    instances still guards against another node writing the same spool.
    """

    def __init__(self, stripes: int = _STRIPES, lock_dir: Path | None = None) -> None:
        self._locks = [threading.Lock() for _ in range(stripes)]
        self._lock_dir = lock_dir
        self._files: dict[int, int] = {}  # stripe -> open lock file descriptor (opened under its stripe's lock)
        if lock_dir is not None:
            lock_dir.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def hold(self, sop_instance_uid: str) -> Iterator[None]:
        stripe = zlib.crc32(sop_instance_uid.encode("ascii", "replace")) % len(self._locks)
        with self._locks[stripe]:
            if self._lock_dir is None:
                yield
                return
            fd = self._files.get(stripe)
            if fd is None:
                fd = self._files[stripe] = os.open(self._lock_dir / f"{stripe:03d}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)  # the thread lock is held: one flock per stripe and process
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)


@dataclass(frozen=True)
class KeptCopy:
    """The accepted row of a SOP instance: the copy the node uses."""

    instance_id: int
    sha256: str
    spool_path: str
    study_uid: str


def quarantine_path(spool_root: Path, sop_instance_uid: str, sha256: str) -> Path:
    """Where a conflicting copy is kept: one folder per SOP instance, one file per distinct content."""
    return spool_root / "quarantine" / uid_to_filename(sop_instance_uid) / f"{sha256}.dcm"


def conflict_reason(sop_instance_uid: str, study_uid: str, sha256: str, kept: KeptCopy, quarantined: Path) -> str:
    """The audit sentence: what differed, which copy was kept and why, where the other one lies."""
    if study_uid != kept.study_uid:
        what = f"arrived in study {study_uid} but is already stored in study {kept.study_uid}"
    else:
        what = "arrived with different content"
    return (
        f"SOP instance {sop_instance_uid} {what} (sha256 {sha256[:16]}..., kept copy {kept.sha256[:16]}...); "
        f"the first acknowledged copy (instance row {kept.instance_id}) stays, because results may already "
        f"derive from it; this copy is kept in quarantine at {quarantined}"
    )
