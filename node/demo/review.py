"""What the demo leaves to look at: previews named by truth and study key, a review-page user, gvr web.

The study key (``node.study_key``) is the one the summary, ``gvr audit`` and the
review page show, so ``HF+_f8abe5da_overlay.png`` is found in all of them.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from node.demo.pacs import free_port
from node.results.build import write_previews
from node.spool import Spool
from node.study_key import study_key

DEMO_USER = "demo"


def truth_label(positive: bool) -> str:
    return "HF+" if positive else "HF-"


def write_named_previews(spool: Spool, job_id: str, study_uid: str, truth_positive: bool, folder: Path) -> list[Path]:
    """The job's SC previews as ``<HF+|HF->_<study key>_<picture>.png`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    prefix = f"{truth_label(truth_positive)}_{study_key(study_uid)}"
    named = []
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        for path in write_previews(spool, job_id, Path(scratch)):
            picture = path.stem.split("-", 1)[1].replace("-sc", "")  # "<image key>-overlay-sc" -> "overlay"
            target = folder / f"{prefix}_{picture}.png"
            path.replace(target)
            named.append(target)
    return named


def add_demo_user(users_file: Path) -> str:
    """A ``demo`` user with a fresh random password for this run's review page; returns the password."""
    from node.web.auth import set_password

    password = secrets.token_urlsafe(9)
    set_password(users_file, DEMO_USER, password)
    return password


@dataclass(frozen=True)
class KeptWeb:
    url: str
    pid: int


def start_web(data_dir: Path, log_file: Path, timeout: float = 30.0) -> KeptWeb:
    """``gvr web`` on a free port, in a session of its own so it outlives the demo; waits for /healthz."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GVR_")}
    env["GVR_DATA_DIR"] = str(data_dir)
    with log_file.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "node.cli.main", "web", "--port", str(port)], env=env,
                                   stdout=log, stderr=log, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gvr web exited with status {process.returncode}; see {log_file}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                return KeptWeb(url, process.pid)
        except OSError:
            time.sleep(0.2)
    process.terminate()
    raise TimeoutError(f"gvr web did not answer within {timeout:.0f} s; see {log_file}")
