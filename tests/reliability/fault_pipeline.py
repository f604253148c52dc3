"""The production pipeline the fault scenarios break: default settings, a PACS that keeps every copy.

Private Redis (append-only file), a PostgreSQL audit DB, ``gvr node``, one
``gvr worker --queues gpu`` and one ``gvr worker --queues dicom`` (prefork pool,
default lease, deadlines and visibility timeout: only the study quiet period and
the assembler's poll are short, so jobs start quickly), and dcmtk's ``storescp
+uf`` as the PACS: unique file names, so every repeated C-STORE is one more file.

``Pipeline.outcome`` gathers what a scenario asserts and records: acknowledged =
stored = audited, one job per study and its state, copies per result object at
the PACS, and the seconds from the fault clearing to the last job SENT.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import select

from node.audit.db import AuditDB
from node.audit.migrate import upgrade
from node.audit.models import (
    Delivery,
    DeliveryStatus,
    Instance,
    InstanceStatus,
    Job,
    JobState,
    Study,
    as_utc,
    utcnow,
)
from tests.peers import LOOPBACK, free_port, require_tool, start_process, stop_process, wait_for_port
from tests.reliability.harness import (
    CALLING_AE,
    FIGURES,
    ManagedProcess,
    RestartableRedis,
    base_env,
    chest_study,
    send_paths,
    start_node,
    start_worker,
    wait_until,
)

PACS_AE = "KEEPALL"
RECOVERY_TARGET_S = 60.0  # issue 10: from the fault clearing to the last job SENT, default settings


class KeepEveryCopyPACS:
    """dcmtk ``storescp +uf``: stores every C-STORE it acknowledges in a file of its own.

    ``sleep_after`` (whole seconds) makes it pause after each answer, so a delivery
    is slow enough to be killed in the middle of its association.
    """

    def __init__(self, folder: Path, sleep_after: int = 0) -> None:
        self.binary = require_tool("storescp", "dcmtk")
        self.folder = folder
        self.sleep_after = sleep_after
        self.port = free_port()
        self.process: Any = None

    @property
    def destination(self) -> str:
        return f"{PACS_AE}@{LOOPBACK}:{self.port}"

    def start(self) -> KeepEveryCopyPACS:
        store = self.folder / "stored"
        store.mkdir(parents=True, exist_ok=True)
        command = [self.binary, "+uf", "-od", str(store), "-aet", PACS_AE, "--sleep-after", str(self.sleep_after),
                   str(self.port)]  # fmt: skip
        self.process = start_process(command, self.folder / "storescp.log", {**os.environ, "TCP_NODELAY": "1"})
        wait_for_port(LOOPBACK, self.port, 20, process=self.process, log=self.folder / "storescp.log")
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def copies(self) -> Counter[str]:
        """SOP Instance UID -> how many files the PACS stored for it."""
        found: Counter[str] = Counter()
        for path in (self.folder / "stored").iterdir():
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            found[str(ds.SOPInstanceUID)] += 1
        return found


@dataclass
class Outcome:
    """What one scenario ended with; ``check`` asserts the issue's targets."""

    scenario: str
    studies: int
    acknowledged: int
    stored: int
    jobs: Counter[str]  # state -> count
    jobs_per_study: Counter[str]
    copies: Counter[str]  # SOP Instance UID -> files at the PACS
    acknowledged_objects: set[str]  # result objects with a SENT Delivery row
    recovery_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def repeats_of_acknowledged(self) -> int:
        return sum(self.copies[uid] - 1 for uid in self.acknowledged_objects if self.copies[uid] > 1)

    def check(self) -> None:
        assert self.acknowledged == self.stored, f"{self.acknowledged} acknowledged, {self.stored} stored+audited"
        assert set(self.jobs_per_study.values()) == {1} and len(self.jobs_per_study) == self.studies
        assert self.jobs == Counter({JobState.SENT.value: self.studies}), self.jobs
        assert self.acknowledged_objects <= set(self.copies), "a result the PACS acknowledged is not stored"
        assert self.repeats_of_acknowledged == 0, {u: n for u, n in self.copies.items() if n > 1}
        assert self.recovery_s <= RECOVERY_TARGET_S, f"recovery took {self.recovery_s:.1f} s"

    def record(self) -> None:
        """Into the suite's figures (printed at the end of the run)."""
        FIGURES.jobs_sent += self.jobs[JobState.SENT.value]
        FIGURES.result_objects_in_pacs += len(self.copies)
        FIGURES.duplicate_objects_in_pacs += sum(self.copies.values()) - len(self.copies)
        extra = f"; {'; '.join(self.notes)}" if self.notes else ""
        FIGURES.notes.append(
            f"{self.scenario}: acknowledged {self.acknowledged} = stored+audited {self.stored}; "
            f"{self.jobs[JobState.SENT.value]}/{self.studies} jobs SENT once; repeat C-STOREs of acknowledged "
            f"objects {self.repeats_of_acknowledged}; fault cleared -> last SENT {self.recovery_s:.1f} s{extra}"
        )


class Pipeline:
    """The processes of one scenario, started with the settings a user gets by default."""

    def __init__(self, tmp_path: Path, audit_url: str, redis: RestartableRedis, pacs: KeepEveryCopyPACS,
                 bundle_dir: Path) -> None:  # fmt: skip
        upgrade(audit_url)
        self.tmp = tmp_path
        self.redis = redis
        self.pacs = pacs
        self.env = base_env(data_dir=str(tmp_path / "data"), port=str(free_port()), database_url=audit_url,
                            broker_url=redis.url, destinations=pacs.destination, bundle_dir=str(bundle_dir),
                            study_stable_seconds="1.5", assembler_poll_seconds="0.3",
                            allowed_calling_aets=CALLING_AE, min_free_disk_mb="0")  # fmt: skip
        self.audit = AuditDB(audit_url)
        self.processes: dict[str, ManagedProcess] = {}
        self.acknowledged: list[str] = []
        self.study_uids: list[str] = []
        self._starts: Counter[str] = Counter()

    @property
    def spool_tmp(self) -> Path:
        return self.tmp / "data" / "spool" / "tmp"

    # -- processes ---------------------------------------------------------------------

    def start(self, name: str) -> ManagedProcess:
        """``node``, ``gpu`` or ``dicom``; a second start of a name (a restart) gets a log of its own."""
        self._starts[name] += 1
        log = self.tmp / f"gvr-{'node' if name == 'node' else 'worker-' + name}-{self._starts[name]}.log"
        process = start_node(self.env, log) if name == "node" else start_worker(name, self.env, log)
        self.processes[name] = process
        return process

    def start_all(self) -> None:
        for name in ("node", "gpu", "dicom"):
            self.start(name)

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop()
        self.audit.dispose()

    # -- studies and jobs ----------------------------------------------------------------

    def send_studies(self, count: int, seed: int, frontal: int = 1) -> None:
        """``count`` studies of ``frontal`` eligible images, over one association."""
        paths: list[Path] = []
        for i in range(count):
            uid, study_paths = chest_study(self.tmp / "in", frontal, 0, seed=seed + 10 * i)
            self.study_uids.append(uid)
            paths += study_paths
        log = send_paths(int(self.env["GVR_PORT"]), paths)
        assert log.error is None, log.error
        self.acknowledged += log.acknowledged

    def job_states(self) -> Counter[str]:
        with self.audit.session() as session:
            return Counter(state.value for state in session.scalars(select(Job.state)))

    def delivered(self, job_id: str | None = None) -> set[str]:
        """Result objects some destination acknowledged (a SENT Delivery row), of one job or all."""
        query = select(Delivery.sop_instance_uid).where(Delivery.status == DeliveryStatus.SENT)
        if job_id is not None:
            query = query.where(Delivery.job_id == job_id)
        with self.audit.session() as session:
            return set(session.scalars(query))

    def wait_all_sent(self, timeout: float) -> None:
        studies = len(self.study_uids)
        wait_until(lambda: self.job_states() == Counter({JobState.SENT.value: studies}), timeout,
                   f"all {studies} jobs SENT (now {dict(self.job_states())})", interval=0.5)  # fmt: skip

    def last_sent(self) -> datetime:
        with self.audit.session() as session:
            moments = list(session.scalars(select(Job.finished_at).where(Job.state == JobState.SENT)))
        return max(as_utc(m) for m in moments if m is not None)

    def outcome(self, scenario: str, fault_cleared: datetime) -> Outcome:
        with self.audit.session() as session:
            stored = {uid: path for uid, path in session.execute(select(Instance.sop_instance_uid, Instance.spool_path)
                      .where(Instance.status == InstanceStatus.ACCEPTED))}  # fmt: skip
            per_study = Counter(session.scalars(select(Study.study_uid).join(Job)))
        kept = [uid for uid in self.acknowledged if (path := stored.get(uid)) and Path(path).is_file()]
        return Outcome(scenario, len(self.study_uids), len(self.acknowledged), len(kept), self.job_states(),
                       per_study, self.pacs.copies(), self.delivered(),
                       (self.last_sent() - fault_cleared).total_seconds())  # fmt: skip


class Supervisor(threading.Thread):
    """Restarts a process that exited, as systemd's ``Restart=always`` does; records each exit status."""

    def __init__(self, pipeline: Pipeline, names: tuple[str, ...]) -> None:
        super().__init__(name="supervisor", daemon=True)
        self.pipeline, self.names = pipeline, names
        self.exits: list[tuple[str, int | None]] = []
        self.error: str | None = None
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.5):
            for name in self.names:
                process = self.pipeline.processes[name]
                if process.alive() or self._done.is_set():
                    continue
                assert process.popen is not None
                self.exits.append((name, process.popen.returncode))
                try:
                    self.pipeline.start(name)
                except Exception as error:  # noqa: BLE001 - reported to the test
                    self.error = repr(error)

    def stop(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join(30)


def now() -> datetime:
    """UTC now, comparable with the audit DB's times (the fault clearing, for ``Pipeline.outcome``)."""
    return utcnow()
