"""The reliability suite's moving parts: processes it can kill, a Redis it can restart, senders, figures.

Every process runs the real command (``gvr node``, ``gvr worker``, ``redis-server``)
with its output in a log file under the test's tmp_path; ``tests/reliability/
test_zz_no_phi_in_logs.py`` reads those logs at the end. Waiting is by
readiness (a port, a log line, a DB state), with a deadline, never a bare sleep.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE

from node.scp import set_nodelay
from tests.factories import make_image, write
from tests.peers import LOOPBACK, free_port, log_tail, require_tool, start_process, wait_for_port

REPO_ROOT = Path(__file__).resolve().parents[2]

# Distinctive on purpose: no log line of any process may ever contain them.
PHI_NAME = "ZQXWYVERN^OTTOLINE"
PHI_ID = "ZQX-PHI-471142"
CALLING_AE = "GVRTEST"


@dataclass
class Figures:
    """What the suite measured; printed by ``pytest_terminal_summary`` in conftest."""

    instances_sent: int = 0
    instances_acknowledged: int = 0
    instances_in_spool_and_audit: int = 0
    studies: int = 0
    eligible_studies: int = 0
    jobs_sent: int = 0
    jobs_failed: int = 0
    result_objects_in_pacs: int = 0
    duplicate_objects_in_pacs: int = 0
    result_resends: int = 0
    bad_inputs_tried: int = 0
    bad_inputs_refused: int = 0
    good_instances_during_bad: int = 0
    log_files_checked: int = 0
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        rows = [(name, value) for name, value in vars(self).items() if name != "notes"]
        return [f"{name.replace('_', ' '):<34} {value}" for name, value in rows] + [f"note: {n}" for n in self.notes]


FIGURES = Figures()


# -- processes ---------------------------------------------------------------------------


def base_env(**settings: str) -> dict[str, str]:
    """This environment without GVR_*, plus ``GVR_<NAME>`` for each keyword; one thread per torch process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GVR_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({f"GVR_{name.upper()}": value for name, value in settings.items()})
    return env


class ManagedProcess:
    """One real process with a log file; ``kill`` is SIGKILL, ``stop`` SIGTERM then SIGKILL."""

    def __init__(self, command: list[str], env: Mapping[str, str], log: Path) -> None:
        self.command = command
        self.env = dict(env)
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None, "not started"
        return int(self.popen.pid)

    def start(self) -> ManagedProcess:
        self.popen = start_process(self.command, self.log, self.env, cwd=REPO_ROOT)
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def wait_for_line(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in (self.log.read_text(errors="replace") if self.log.exists() else ""):
            if not self.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.command[3:5]} never logged {text!r}:\n{log_tail(self.log)}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the process and its children at once (a prefork worker's pool too), as the OOM killer
        or a host crash does: nobody gets to acknowledge, release or clean up anything."""
        if self.alive():
            assert self.popen is not None
            for pid in [*_children(self.pid), self.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.popen.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        assert self.popen is not None
        self.popen.terminate()
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def _children(pid: int) -> list[int]:
    """Child pids of ``pid`` (Linux /proc), grandchildren first."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in task.read_text().split():
            found += [*_children(int(child)), int(child)]
    return found


def gvr(*argv: str, env: Mapping[str, str], log: Path) -> ManagedProcess:
    return ManagedProcess([sys.executable, "-m", "node.cli.main", *argv], env, log)


def start_node(env: Mapping[str, str], log: Path, timeout: float = 30.0) -> ManagedProcess:
    """``gvr node`` with ``env`` (GVR_PORT must be set); returns once the port accepts."""
    node = gvr("node", env=env, log=log).start()
    assert node.popen is not None
    wait_for_port(LOOPBACK, int(env["GVR_PORT"]), timeout, process=node.popen, log=log)
    return node


def start_worker(queues: str, env: Mapping[str, str], log: Path, *extra: str, timeout: float = 60.0) -> ManagedProcess:
    """``gvr worker --queues <queues>`` with the pool a user gets (prefork, one process); returns once
    Celery logged "ready."."""
    worker = gvr("worker", "--queues", queues, "-n", f"{log.stem}@{LOOPBACK}", *extra,
                 env=env, log=log).start()  # fmt: skip
    worker.wait_for_line(" ready.", timeout)
    return worker


class RestartableRedis:
    """A private ``redis-server`` on a fixed free port, with an fsynced append-only file.

    Persistence is the point: a restarted Redis must still hold the queued and the
    unacknowledged jobs (the production configuration in docs/deployment.md).
    """

    def __init__(self, workdir: Path) -> None:
        self.binary = require_tool("redis-server", "redis-server")
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> RestartableRedis:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [self.binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "yes",
                   "--appendfsync", "always", "--dir", str(self.workdir)]  # fmt: skip
        log = self.workdir / "redis.log"
        self.process = start_process(command, log)
        wait_for_port(LOOPBACK, self.port, 20, process=self.process, log=log)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: Redis flushes the append-only file and exits
            self.process.wait(20)

    def kill(self) -> None:
        """SIGKILL, as a crash does: no shutdown; what survives is what the append-only file holds."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(20)

    def restart(self) -> float:
        """Stop and start on the same port; returns the seconds it was unreachable."""
        began = time.monotonic()
        self.stop()
        self.start()
        self.restarts += 1
        return time.monotonic() - began


# -- DICOM ---------------------------------------------------------------------------------


def chest_study(folder: Path, frontal: int, lateral: int, seed: int) -> tuple[str, list[Path]]:
    """One study: ``frontal`` PA phantom radiographs (eligible, complete DX headers) and ``lateral``
    small LL images (stored, never analysed), all 64x64 and carrying the suite's PHI values."""
    from training.phantom_dicom import phantom_dataset
    from training.phantoms import make_phantom

    study = generate_uid()
    datasets = []
    for i in range(frontal):
        ds = phantom_dataset(make_phantom(seed + i, 64), monochrome1=False)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.ViewPosition = study, generate_uid(), "PA"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID = PHI_NAME, PHI_ID
        datasets.append(ds)
    for i in range(lateral):
        ds = make_image(study, view="LL", seed=seed + 100 + i, patient_name=PHI_NAME, patient_id=PHI_ID)
        ds.PatientOrientation = ["A", "F"]
        datasets.append(ds)
    return study, [write(ds, folder) for ds in datasets]


def phi_image(study_uid: str | None = None, **kwargs: Any) -> Dataset:
    """``make_image`` with the suite's distinctive patient name and ID."""
    return make_image(study_uid or generate_uid(), patient_name=PHI_NAME, patient_id=PHI_ID, **kwargs)


@dataclass
class SendLog:
    """What one sender saw: SOP Instance UID -> DIMSE status (None: no answer)."""

    statuses: dict[str, int | None] = field(default_factory=dict)
    error: str | None = None

    @property
    def acknowledged(self) -> list[str]:
        return [uid for uid, status in self.statuses.items() if status == 0]


def send_paths(port: int, paths: Iterable[Path], calling_ae: str = CALLING_AE, stop_on_loss: bool = True,
               tls: Any = None) -> SendLog:  # fmt: skip
    """C-STORE files over one association (explicit VR LE DX/CT/...); records each status."""
    import pydicom

    paths = list(paths)
    result = SendLog()
    classes = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in paths[:1] + paths[-1:]}
    ae = AE(ae_title=calling_ae)
    for sop_class in sorted(classes):
        ae.add_requested_context(sop_class, "1.2.840.10008.1.2.1")
    assoc = ae.associate(LOOPBACK, port, ae_title="GVRNODE", tls_args=tls)
    if not assoc.is_established:
        result.error = "association not established"
        return result
    transport = assoc.dul.socket
    if transport is not None and transport.socket is not None:
        set_nodelay(transport.socket)
    try:
        for path in paths:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
            try:
                status = assoc.send_c_store(path)
            except (RuntimeError, ValueError, OSError) as error:
                result.statuses[uid], result.error = None, str(error)
                if stop_on_loss:
                    break
                continue
            result.statuses[uid] = int(status.Status) if "Status" in status else None
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return result


def send_in_parallel(port: int, batches: list[list[Path]]) -> list[SendLog]:
    """One association per batch, all at once (threads); returns each batch's log."""
    logs = [SendLog() for _ in batches]

    def run(index: int) -> None:
        try:
            logs[index] = send_paths(port, batches[index])
        except Exception as error:  # noqa: BLE001 - a sender thread must report, not vanish
            logs[index].error = repr(error)

    threads = [threading.Thread(target=run, args=(i,), name=f"sender-{i}") for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return logs


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def connect_raw(port: int, timeout: float = 5.0) -> socket.socket:
    """A plain TCP connection to the SCP, for writing PDUs by hand."""
    sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
