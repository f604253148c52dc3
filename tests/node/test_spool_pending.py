"""Spool writes that start before the instance's final name is known (issue 12)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from node.spool import Spool


def test_pending_write_published_is_whole_and_first_copy_kept(tmp_path: Path) -> None:
    """publish links the fsynced bytes under the final name; a second copy never replaces the first."""
    spool = Spool(tmp_path / "spool", owner="test")
    final = spool.instance_path("1.2.3", "1.2.3.4")
    with spool.begin(b"first copy") as pending:
        stored = pending.publish(final)
    assert stored.created and final.read_bytes() == b"first copy"
    assert stored.sha256 == hashlib.sha256(b"first copy").hexdigest() and stored.size_bytes == 10
    with spool.begin(b"second copy") as pending:
        again = pending.publish(final)
    assert not again.created and final.read_bytes() == b"first copy"
    assert again.sha256 == hashlib.sha256(b"second copy").hexdigest()
    assert list(spool.tmp.iterdir()) == []


def test_pending_write_never_published_leaves_no_temporary_file(tmp_path: Path) -> None:
    """An instance refused while its bytes were being written: the temporary file goes, nothing is linked."""
    spool = Spool(tmp_path / "spool", owner="test")
    with spool.begin(b"refused instance") as pending:
        pass
    pending.flushed.result(timeout=10)
    removed = threading.Event()
    for _ in range(1000):  # the removal runs on the writer's thread just after the write: give it a moment
        if not list(spool.tmp.iterdir()):
            removed.set()
            break
        removed.wait(0.01)
    assert removed.is_set(), list(spool.tmp.iterdir())
    assert list(spool.incoming.rglob("*")) == []
