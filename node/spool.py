"""The spool: where received instances lie, written atomically and durably.

A file reaches its final name only by ``link``/``rename`` from a temporary file
of the same filesystem, so a reader never sees half an instance. ``store`` (and
``PendingWrite.publish``) fsync the file before it is named, so not even a crash
leaves half a file under a final name. ``PendingWrite.publish_then_flush`` names
it first and flushes file and folder together: for names whose readers trust an
audit row, never the bare file (received instances). Layout::

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
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
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


def fsync_folder(path: Path) -> None:
    """Make the entries of folder ``path`` (a new or renamed name in it) durable."""
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
        """Start writing and fsyncing ``data`` to a temporary file on a helper thread; ``publish...`` names it.

        issue 12: the SCP checks the header while the bytes go to disk, instead of after.
        Use as a context manager: a write that is never published is removed.
        Raises ``SpoolFullError`` when the write would leave less than the configured free space.
        """
        if self.min_free_bytes and self.free_bytes() - len(data) < self.min_free_bytes:
            raise SpoolFullError(errno.ENOSPC, f"spool {self.root} below its free-space floor")
        written: Future[Path] = Future()
        flushed = self._writer.submit(_write_temporary, self.tmp, data, written)
        return PendingWrite(self, data, written, flushed)

    def _ensure_folder(self, folder: Path) -> None:
        """Create a study folder and make its name durable, once per process.

        The per-instance cost is then a set lookup instead of a ``mkdir`` call.
        The parent is fsynced even when the folder already existed: another
        thread may have created it and not yet made its name durable.
        """
        if folder in self._folders:
            return
        folder.mkdir(parents=True, exist_ok=True)
        fsync_folder(folder.parent)
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
    """An instance's bytes on their way to a fsynced temporary file; ``publish...`` gives them their final name.

    ``written`` resolves to the temporary file once its bytes are written (not yet durable),
    ``flushed`` once they are also fsynced.
    """

    def __init__(self, spool: Spool, data: bytes, written: Future[Path], flushed: Future[Path]) -> None:
        self.spool = spool
        self.data = data
        self.written = written
        self.flushed = flushed
        self.published = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        if not self.published:  # refused, or failed: the temporary file goes once its fsync ended, without waiting
            self.flushed.add_done_callback(self._remove_temporary)

    def publish(self, final: Path, replace: bool = False) -> SpooledFile:
        """Link the fsynced file to ``final`` (see ``Spool.store``) and make the link durable; once only."""
        digest = self._claim(final)
        try:
            tmp = self._outcome(self.flushed)
        except BaseException:
            self._remove_temporary(self.flushed)
            raise
        created = self._link(tmp, final, replace)
        if created:
            fsync_folder(final.parent)
        return SpooledFile(final, digest, len(self.data), created)

    def publish_then_flush(self, final: Path) -> SpooledFile:
        """Link the written bytes to ``final`` if it is free, then make file and link durable together; once only.

        issue 12: the folder's fsync runs beside the file's (ext4 commits both in one journal
        transaction) instead of after it. Returns only once both are durable, and on failure
        removes the name again; but a crash in between leaves ``final`` without its bytes
        durable. Only for names no reader trusts without its own record (the audit row) saying
        they were received: ``Ingestor`` replaces such a leftover when the instance comes again.
        """
        digest = self._claim(final)
        tmp = self._outcome(self.written)
        ours = tmp.stat().st_ino  # the link shares it: on failure, remove the name only while it is still ours
        created = self._link(tmp, final, replace=False)
        if created:
            try:
                fsync_folder(final.parent)
                self._outcome(self.flushed)
            except BaseException:
                _unlink_if_inode(final, ours)  # never durable: nothing may find it and take it as received
                raise
        return SpooledFile(final, digest, len(self.data), created)

    def _claim(self, final: Path) -> str:
        """Mark the write published (once only) and hash the bytes while the helper writes them."""
        if self.published:
            raise RuntimeError(f"write for {final} already published")
        self.published = True
        return _sha256_hex(self.data)  # releases the GIL: hashed while the helper's write and fsync run

    def _outcome(self, step: Future[Path]) -> Path:
        """The temporary file once ``step`` is done; else its error, a full disk as ``SpoolFullError``."""
        with _full_disk_as_spool_full(self.spool):
            return step.result()

    def _remove_temporary(self, _flushed: Future[Path]) -> None:
        """Remove the temporary file, if it was written (its fsync has ended, well or not)."""
        if self.written.done() and self.written.exception() is None:
            self.written.result().unlink(missing_ok=True)

    def _link(self, tmp: Path, final: Path, replace: bool) -> bool:
        try:
            with _full_disk_as_spool_full(self.spool):
                self.spool._ensure_folder(final.parent)
                return self.spool._publish(tmp, final, replace)
        finally:
            tmp.unlink(missing_ok=True)


def _unlink_if_inode(path: Path, inode: int) -> None:
    """Remove ``path`` unless another writer (a second node process on this spool) has replaced it since."""
    try:
        if path.stat().st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass


@contextmanager
def _full_disk_as_spool_full(spool: Spool) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise SpoolFullError(errno.ENOSPC, f"spool {spool.root} is full") from error
        raise


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


def _write_temporary(folder: Path, data: bytes, written: Future[Path]) -> Path:
    """A new file in ``folder`` holding ``data``: ``written`` is told once the bytes are written, fsynced after.

    A file whose write fails is removed again; once ``written`` is told, the file is the
    ``PendingWrite``'s to remove (the publisher may be linking it while the fsync runs).
    """
    fd, name = -1, ""
    try:
        fd, name = tempfile.mkstemp(dir=folder, suffix=".part")
        view = memoryview(data)
        while view:  # straight to the descriptor, no buffered copy
            view = view[os.write(fd, view) :]
        written.set_result(Path(name))
        os.fsync(fd)
    except BaseException as error:
        if not written.done():
            if name:
                os.unlink(name)
            written.set_exception(error)
        raise
    finally:
        if fd >= 0:
            os.close(fd)
    return Path(name)


def _link_or_replace(tmp: Path, final: Path, replace: bool) -> bool:
    if replace:
        os.replace(tmp, final)
        return True
    try:
        os.link(tmp, final)  # atomic "create if absent": never overwrites a first copy
    except FileExistsError:
        return False
    return True
