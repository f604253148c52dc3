"""One result object written to the outbox as a DICOM file, atomically and durably, without a copy in memory.

``Spool.store`` takes the file's bytes: for a result object that meant pydicom encoding
it into a ``BytesIO`` (growing, then copied out by ``getvalue``) and the spool hashing
all of it for a digest the outbox never uses; at 3000 px, 60 MB per study, ~0.15 s of
the delivery worker's CPU. Here pydicom writes straight into the temporary file, and
the durability steps are ``Spool.store``'s: the file is fsynced before it gets its
name (``os.replace`` in the same filesystem), and the folder after, so a crash leaves
either the whole object or none under its name; the spool's free-space floor holds.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from pydicom import Dataset

from node.spool import Spool, SpoolFullError, fsync_folder


def make_folder(folder: Path) -> None:
    """Create ``folder`` if needed and make its name durable (fsynced even when it existed: it may be new)."""
    folder.mkdir(parents=True, exist_ok=True)
    fsync_folder(folder.parent)


def write_dataset_file(spool: Spool, ds: Dataset, final: Path) -> None:
    """``ds`` as a DICOM file (preamble, file meta) at ``final``, replacing any file there.

    The folder must exist (``make_folder``); its fsync after the rename is the caller's
    (``fsync_folder``), once for all the objects it writes. Raises ``SpoolFullError``
    when the file leaves less than the spool's free-space floor.
    """
    fd, name = tempfile.mkstemp(dir=spool.tmp, suffix=".part")  # the process's own folder: cleared after a crash
    try:
        with os.fdopen(fd, "wb") as file:
            ds.save_as(file, enforce_file_format=True)
            file.flush()
            os.fsync(file.fileno())
        if spool.min_free_bytes and spool.free_bytes() < spool.min_free_bytes:
            raise SpoolFullError(errno.ENOSPC, f"spool {spool.root} below its free-space floor")
        os.replace(name, final)
    except BaseException as error:
        Path(name).unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC and not isinstance(error, SpoolFullError):
            raise SpoolFullError(errno.ENOSPC, f"spool {spool.root} is full") from error
        raise
