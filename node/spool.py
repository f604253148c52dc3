"""The spool: where received instances lie, written atomically and durably.

A file reaches its final name only by ``link``/``rename`` from a temporary file
that was written and fsynced in the same filesystem, so a reader (or a crash)
never sees half an instance. Layout::

    <spool>/incoming/<StudyInstanceUID>/<SOPInstanceUID>.dcm
    <spool>/tmp/            partial writes, removed at start-up
    <spool>/results/<job>/  inference artefacts
    <spool>/outbox/<job>/   result objects waiting for delivery
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

_SAFE_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class SpoolFullError(OSError):
    """Too little free space: the SCP answers 0xA700 (out of resources)."""


@dataclass(frozen=True)
class SpooledFile:
    """Where an instance now lies and what exactly was stored."""

    path: Path
    sha256: str
    size_bytes: int
    created: bool  # False when a file with this name was already there (a duplicate)


def uid_to_filename(uid: str) -> str:
    """A UID as a file name; anything that is not a plain UID is hashed (no path tricks)."""
    if len(uid) <= 64 and _SAFE_UID.match(uid):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """The spool directory of one node (a shared mount when workers run elsewhere)."""

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.incoming = root / "incoming"
        self.tmp = root / "tmp"
        self.results = root / "results"
        self.outbox = root / "outbox"
        for folder in (self.incoming, self.tmp, self.results, self.outbox):
            folder.mkdir(parents=True, exist_ok=True)

    def clear_partial_writes(self) -> int:
        """Remove temporary files a crash left behind; returns how many."""
        removed = 0
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def instance_path(self, study_uid: str, sop_instance_uid: str) -> Path:
        return self.incoming / uid_to_filename(study_uid) / f"{uid_to_filename(sop_instance_uid)}.dcm"

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def store(self, data: bytes, final: Path, replace: bool = False) -> SpooledFile:
        """Write ``data`` to ``final`` atomically and durably.

        With ``replace=False`` an existing file is kept untouched and the result
        says ``created=False``: the caller decides whether that is a duplicate.
        Raises ``SpoolFullError`` when the write would leave less than the
        configured free space.
        """
        if self.min_free_bytes and self.free_bytes() - len(data) < self.min_free_bytes:
            raise SpoolFullError(errno.ENOSPC, f"spool {self.root} below its free-space floor")
        digest = hashlib.sha256(data).hexdigest()
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            created = self._publish(Path(tmp_name), final, replace)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise SpoolFullError(errno.ENOSPC, f"spool {self.root} is full") from error
            raise
        finally:
            Path(tmp_name).unlink(missing_ok=True)
        if created:
            _fsync_dir(final.parent)
        return SpooledFile(final, digest, len(data), created)

    @staticmethod
    def _publish(tmp: Path, final: Path, replace: bool) -> bool:
        if replace:
            os.replace(tmp, final)
            return True
        try:
            os.link(tmp, final)  # atomic "create if absent": never overwrites a first copy
        except FileExistsError:
            return False
        return True
