"""``gvr worker`` exits with the worker's own status: an unrecoverable error is visible, a clean stop is 0.

Issue 10: after a Redis restart a dicom worker logged ``Unrecoverable error:
AttributeError(...)`` and stopped, but ``Celery.worker_main`` drops the status, so the
process ended with 0. ``inference.cli.worker.run_worker`` returns it. The failure is
made real inside a real Celery worker: a worker bootstep that raises when started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.peers import start_process

REPO_ROOT = Path(__file__).resolve().parents[2]

FAILING_WORKER = """
import sys
from celery import bootsteps
from inference.cli.worker import run_worker
from inference.worker_app import make_worker_app
from node.config import load_settings

class BreaksOnStart(bootsteps.StartStopStep):
    def start(self, worker):
        raise AttributeError("'NoneType' object has no attribute 'hostname'")

app = make_worker_app(load_settings(), modules=("node.delivery",))
app.steps["worker"].add(BreaksOnStart)
sys.exit(run_worker(app, ["worker", "--queues", "dicom", "--pool", "solo", "--without-gossip",
                          "--without-mingle", "--hostname", "exit-test@localhost"]))
"""


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GVR_")}
    env.update(GVR_DATA_DIR=str(tmp_path / "data"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def test_run_worker_unrecoverable_error_exits_non_zero(tmp_path: Path) -> None:
    """A worker that stops on an "Unrecoverable error" ends its process with status 1 (Celery's EX_FAILURE)."""
    done = subprocess.run([sys.executable, "-c", FAILING_WORKER], env=_env(tmp_path), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert "Unrecoverable error" in done.stdout + done.stderr, done.stderr[-2000:]
    assert done.returncode == 1


def test_gvr_worker_sigterm_exits_zero(tmp_path: Path) -> None:
    """A real ``gvr worker --queues dicom`` stopped with SIGTERM (warm shutdown) still exits 0."""
    log = tmp_path / "gvr-worker.log"
    command = [sys.executable, "-m", "node.cli.main", "worker", "--queues", "dicom", "-n", "exit-test@localhost"]
    worker = start_process(command, log, _env(tmp_path), cwd=REPO_ROOT)
    try:
        from tests.reliability.harness import wait_until

        wait_until(lambda: " ready." in log.read_text(errors="replace") or worker.poll() is not None, 60,
                   "the worker to be ready")  # fmt: skip
        assert worker.poll() is None, log.read_text(errors="replace")[-2000:]
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
