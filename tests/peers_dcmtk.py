"""dcmtk's command-line tools, resolved to the real ones and not to same-named impostors.

pynetdicom installs its own ``storescu``, ``storescp``, ``echoscu``, ``findscu``
... into the virtual environment, so with ``.venv/bin`` first in PATH a bare
``"storescu"`` runs pynetdicom's Python app. ``dcmtk_tool`` searches PATH but
skips virtual environments' script folders, and accepts a candidate only when
``<tool> --version`` names dcmtk (or OFFIS). No pytest here: the benchmarks use
it too; tests go through ``tests.peers.require_tool``, which skips instead.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

INSTALL_HINT = "apt-get install dcmtk"
VERSION_MARKERS = ("dcmtk", "offis")


class DcmtkNotFound(RuntimeError):
    """No dcmtk build of the tool on PATH outside virtual environments; the message says what to install."""


def dcmtk_tool(name: str) -> str:
    """The absolute path of dcmtk's ``name`` (e.g. ``storescu``) on the current PATH; raises ``DcmtkNotFound``."""
    return _resolve(name, os.environ.get("PATH", os.defpath), sys.prefix)


def is_venv_bin(directory: Path, prefix: str = sys.prefix) -> bool:
    """Whether ``directory`` is a virtual environment's scripts folder (this one's, or any with a pyvenv.cfg)."""
    try:
        if directory.resolve() == (Path(prefix) / "bin").resolve():
            return True
    except OSError:
        return False
    return (directory.parent / "pyvenv.cfg").is_file()


def names_dcmtk(path: str) -> bool:
    """Whether ``path --version`` says it is dcmtk (dcmtk prints ``$dcmtk: storescu v3.6.7 ... $``)."""
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    text = (done.stdout + done.stderr).lower()
    return any(marker in text for marker in VERSION_MARKERS)


@functools.lru_cache(maxsize=64)
def _resolve(name: str, search_path: str, prefix: str) -> str:
    rejected: list[str] = []
    for entry in filter(None, search_path.split(os.pathsep)):
        directory = Path(entry)
        candidate = directory / name
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        if is_venv_bin(directory, prefix) or not names_dcmtk(str(candidate)):
            rejected.append(str(candidate))
            continue
        return str(candidate)
    skipped = f" (not dcmtk: {', '.join(rejected)})" if rejected else ""
    raise DcmtkNotFound(f"dcmtk's {name} not found on PATH{skipped}: {INSTALL_HINT}")
