"""The spool: where received instances lie, written atomically and durably.

A file reaches its final name only by ``link``/``rename`` from a temporary file
that was written and fsynced in the same filesystem, so a reader (or a crash)
never sees half an instance. Layout::

    <spool>/incoming/<StudyInstanceUID>/<SOPInstanceUID>.dcm
    <spool>/tmp/<owner>/    partial writes of one process: ``node``, or ``<role>-<host>-<pid>``
    <spool>/results/<job>/  inference artefacts
    <spool>/outbox/<job>/   result objects waiting for delivery
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Self

_SAFE_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_MAX_KNOWN_FOLDERS = 10_000
_WRITERS = 16  # concurrent temporary-file writes: one per association in flight, up to this many


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

    def __init__(self, root: Path, min_free_bytes: int = 0, owner: str | None = None) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.incoming = root / "incoming"
        # issue 10: each process writes its partial files in a folder of its own, so cleaning up
        # after a crash never removes a file another live process is writing
        self.owner = owner or process_owner("proc")
        self.tmp = root / "tmp" / self.owner
        self.results = root / "results"
        self.outbox = root / "outbox"
        self._folders: set[Path] = set()  # study folders known to exist (skips a mkdir per instance)
        # writes run here (os.write and fsync release the GIL) while the caller checks the header
        self._writer = ThreadPoolExecutor(max_workers=_WRITERS, thread_name_prefix="spool-write")
        for folder in (self.incoming, self.tmp, self.results, self.outbox):
            folder.mkdir(parents=True, exist_ok=True)

    def clear_partial_writes(self) -> int:
        """Remove temporary files this owner's earlier life (a crash) left behind; returns how many.

        Touches only this owner's folder, and the folders of processes on this host that are
        gone (their pid no longer runs); another live process's partial files are never removed.
        """
        removed = _clear_folder(self.tmp)
        host = socket.gethostname()
        for folder in self.tmp.parent.iterdir():
            if folder.is_file():  # a partial file of the flat layout before owners
                folder.unlink(missing_ok=True)
                removed += 1
            elif folder != self.tmp and _owner_is_gone(folder.name, host):
                removed += _clear_folder(folder)
                folder.rmdir()
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
        with self.begin(data) as pending:
            return pending.publish(final, replace)

    def begin(self, data: bytes) -> PendingWrite:
        """Start writing and fsyncing ``data`` to a temporary file on a helper thread; ``publish`` names it.

        issue 12: the SCP checks the header while the bytes go to disk, instead of after.
        Use as a context manager: a write that is never published is removed.
        Raises ``SpoolFullError`` when the write would leave less than the configured free space.
        """
        if self.min_free_bytes and self.free_bytes() - len(data) < self.min_free_bytes:
            raise SpoolFullError(errno.ENOSPC, f"spool {self.root} below its free-space floor")
        return PendingWrite(self, data, self._writer.submit(_write_temporary, self.tmp, data))

    def _ensure_folder(self, folder: Path) -> None:
        """Create a study folder and make its name durable, once per process.

        The per-instance cost is then a set lookup instead of a ``mkdir`` call.
        The parent is fsynced even when the folder already existed: another
        thread may have created it and not yet made its name durable.
        """
        if folder in self._folders:
            return
        folder.mkdir(parents=True, exist_ok=True)
        _fsync_dir(folder.parent)
        if len(self._folders) >= _MAX_KNOWN_FOLDERS:
            self._folders.clear()  # bounded memory; a forgotten folder only costs one more fsync
        self._folders.add(folder)

    def _publish(self, tmp: Path, final: Path, replace: bool) -> bool:
        try:
            return _link_or_replace(tmp, final, replace)
        except FileNotFoundError:  # the study folder was removed since we created it
            self._folders.discard(final.parent)
            self._ensure_folder(final.parent)
            return _link_or_replace(tmp, final, replace)


class PendingWrite:
    """An instance's bytes on their way to a fsynced temporary file; ``publish`` gives them their final name."""

    def __init__(self, spool: Spool, data: bytes, written: Future[Path]) -> None:
        self.spool = spool
        self.data = data
        self.written = written
        self.published = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        if not self.published:  # refused, or failed: the temporary file goes once it exists, without waiting
            self.written.add_done_callback(_remove_written)

    def publish(self, final: Path, replace: bool = False) -> SpooledFile:
        """Link the fsynced file to ``final`` (see ``Spool.store``) and make the link durable; once only."""
        if self.published:
            raise RuntimeError(f"write for {final} already published")
        self.published = True
        digest = _sha256_hex(self.data)  # releases the GIL: hashed while the helper's fsync waits on the disk
        try:
            tmp = self.written.result()
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise SpoolFullError(errno.ENOSPC, f"spool {self.spool.root} is full") from error
            raise
        try:
            self.spool._ensure_folder(final.parent)
            created = self.spool._publish(tmp, final, replace)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise SpoolFullError(errno.ENOSPC, f"spool {self.spool.root} is full") from error
            raise
        finally:
            tmp.unlink(missing_ok=True)
        if created:
            _fsync_dir(final.parent)
        return SpooledFile(final, digest, len(self.data), created)


def _remove_written(written: Future[Path]) -> None:
    if written.exception() is None:
        written.result().unlink(missing_ok=True)


def process_owner(role: str) -> str:
    """The tmp folder name of this process: ``<role>-<host>-<pid>``."""
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


def _owner_is_gone(name: str, host: str) -> bool:
    """Whether tmp folder ``name`` belongs to a process of this host that no longer runs."""
    prefix, _, pid = name.rpartition("-")
    if not prefix.endswith(f"-{host}") or not pid.isdigit():
        return False  # the node's own, or another host's (a shared spool): not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _clear_folder(folder: Path) -> int:
    removed = 0
    for leftover in folder.iterdir():
        leftover.unlink(missing_ok=True)
        removed += 1
    return removed


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()  # releases the GIL: runs beside the fsync


def _write_temporary(folder: Path, data: bytes) -> Path:
    """A new file in ``folder`` holding ``data``, written and fsynced; removed again if that fails."""
    fd, name = tempfile.mkstemp(dir=folder, suffix=".part")
    try:
        _write_and_fsync(fd, data)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def _write_and_fsync(fd: int, data: bytes) -> None:
    """Write straight to the descriptor (no buffered copy), fsync, close."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_or_replace(tmp: Path, final: Path, replace: bool) -> bool:
    if replace:
        os.replace(tmp, final)
        return True
    try:
        os.link(tmp, final)  # atomic "create if absent": never overwrites a first copy
    except FileExistsError:
        return False
    return True
