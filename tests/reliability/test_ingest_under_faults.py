"""Production mode under faults: 1,000 instances over 8 associations, a GPU worker SIGKILLed mid-job, Redis restarted.

Redis broker (private, append-only file), PostgreSQL audit DB, ``gvr node``, two
``gvr worker --queues gpu`` and one ``gvr worker --queues dicom``, Orthanc as the
PACS. Afterwards: every acknowledged instance is in the spool and the audit DB,
every study with an eligible image has exactly one job and it is SENT, studies
without one have none, and Orthanc holds each result object exactly once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

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
    StudyState,
)
from tests.peers import LOOPBACK, direct_opener, free_port
from tests.peers_orthanc import Orthanc
from tests.reliability.harness import (
    CALLING_AE,
    FIGURES,
    ManagedProcess,
    RestartableRedis,
    base_env,
    chest_study,
    send_in_parallel,
    start_node,
    start_worker,
    wait_until,
)

STUDIES = 50  # 20 instances each: 1,000 in all
PER_STUDY = 20
WITHOUT_ELIGIBLE = 5  # studies of lateral views only: stored, audited, never analysed
ASSOCIATIONS = 8
OBJECTS_PER_IMAGE = 4  # a positive: overlay SC, side-by-side SC, cine SC, SR (node.results.build)
MIN_OBJECTS_PER_IMAGE = 2  # a negative or out-of-distribution image: overlay SC (no colour), SR
WORKER_OPTIONS = ("--max-steps", "20")  # issue 10: recovery with the default settings


class Chaos(threading.Thread):
    """SIGKILL ``victim`` while it runs a job, then restart Redis once; records what it did."""

    def __init__(self, audit: AuditDB, victim: ManagedProcess, victim_name: str, redis: RestartableRedis) -> None:
        super().__init__(name="chaos", daemon=True)
        self.audit, self.victim, self.victim_name, self.redis = audit, victim, victim_name, redis
        self.killed_job: str | None = None
        self.redis_down_seconds: float | None = None
        self.error: str | None = None

    def run(self) -> None:
        marker = f"{self.victim_name}@"  # the job runs in the prefork pool's process, under the worker's name
        deadline = time.monotonic() + 120
        try:
            while self.killed_job is None and time.monotonic() < deadline:
                with self.audit.session() as session:
                    self.killed_job = session.scalar(
                        select(Job.id).where(Job.state == JobState.RUNNING, Job.worker.contains(marker))
                    )
                if self.killed_job is None:
                    time.sleep(0.02)
            self.victim.kill()
            time.sleep(1.0)
            self.redis_down_seconds = self.redis.restart()
        except Exception as error:  # noqa: BLE001 - the thread reports any failure to the test
            self.error = repr(error)


def _gvr_status(env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """``gvr status --json``: its exit status (the health check) and what it reported."""
    done = subprocess.run([sys.executable, "-m", "node.cli.main", "status", "--json"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert done.stdout, done.stderr
    return done.returncode, dict(json.loads(done.stdout))


def _metrics(port: int) -> str:
    with direct_opener().open(f"http://{LOOPBACK}:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def _settled(audit: AuditDB, eligible: int) -> bool:
    with audit.session() as session:
        done = session.scalar(select(func.count()).where(Job.state.in_([JobState.SENT, JobState.FAILED])))
        receiving = session.scalar(select(func.count()).where(Study.state == StudyState.RECEIVING))
    return bool(done == eligible and receiving == 0)


def test_thousand_instances_worker_killed_redis_restarted(
    tmp_path: Path, private_redis: RestartableRedis, postgres_url: str, bundle_dir: Path
) -> None:
    """Every ack kept; one SENT job per eligible study; each result object once in Orthanc."""
    studies = [chest_study(tmp_path / "in", 0 if i < WITHOUT_ELIGIBLE else 1,
                           PER_STUDY - (0 if i < WITHOUT_ELIGIBLE else 1), seed=i * 1000)
               for i in range(STUDIES)]  # fmt: skip
    batches: list[list[Path]] = [[] for _ in range(ASSOCIATIONS)]
    for index, (_uid, paths) in enumerate(studies):
        batches[index % ASSOCIATIONS].extend(paths)  # a study never spans two associations
    eligible_uids = {uid for i, (uid, _) in enumerate(studies) if i >= WITHOUT_ELIGIBLE}

    pacs = Orthanc(tmp_path / "orthanc").start()
    upgrade(postgres_url)
    metrics_port = free_port()
    env = base_env(data_dir=str(tmp_path / "data"), port=str(free_port()), database_url=postgres_url,
                   broker_url=private_redis.url, destinations=f"ORTHANC@{LOOPBACK}:{pacs.dicom_port}",
                   bundle_dir=str(bundle_dir), study_stable_seconds="2", assembler_poll_seconds="0.3",
                   allowed_calling_aets=CALLING_AE, min_free_disk_mb="0", metrics_port=str(metrics_port))  # fmt: skip
    processes: list[ManagedProcess] = []
    audit = AuditDB(postgres_url)
    try:
        processes.append(start_node(env, tmp_path / "gvr-node.log"))
        victim = start_worker("gpu", env, tmp_path / "gvr-worker-gpu-a.log", *WORKER_OPTIONS)
        processes += [victim, start_worker("gpu", env, tmp_path / "gvr-worker-gpu-b.log", *WORKER_OPTIONS),
                      start_worker("dicom", env, tmp_path / "gvr-worker-dicom.log")]
        chaos = Chaos(audit, victim, "gvr-worker-gpu-a", private_redis)
        chaos.start()
        began = time.monotonic()
        logs = send_in_parallel(int(env["GVR_PORT"]), batches)
        ingest_seconds = time.monotonic() - began
        chaos.join(150)
        wait_until(lambda: _settled(audit, len(eligible_uids)), 150, "every eligible study's job to finish")
        total_seconds = time.monotonic() - began
        status_code, status = _gvr_status(env)
        metrics = _metrics(metrics_port)

        acknowledged = [uid for log in logs for uid in log.acknowledged]
        assert [log.error for log in logs] == [None] * ASSOCIATIONS
        assert len(acknowledged) == STUDIES * PER_STUDY
        assert chaos.error is None and chaos.killed_job is not None, "the worker was not killed mid-job"
        assert chaos.redis_down_seconds is not None

        with audit.session() as session:
            stored = {row.sop_instance_uid: row.spool_path for row in session.execute(
                select(Instance.sop_instance_uid, Instance.spool_path).where(Instance.status == InstanceStatus.ACCEPTED))}
            jobs = session.execute(select(Study.study_uid, Job.state, Job.attempts, Job.id).join(Job)).all()
            no_eligible = set(session.scalars(select(Study.study_uid).where(Study.state == StudyState.NO_ELIGIBLE)))
            sends = Counter(session.execute(select(Delivery.sop_instance_uid, Delivery.destination).where(
                Delivery.status == DeliveryStatus.SENT)).all())  # fmt: skip
        kept = [uid for uid in acknowledged if uid in stored and Path(stored[uid]).is_file()]
        assert len(kept) == len(acknowledged), "an acknowledged instance is missing from the spool or audit DB"

        per_study = Counter(uid for uid, *_ in jobs)
        assert set(per_study) == eligible_uids and set(per_study.values()) == {1}
        assert {state for _, state, *_ in jobs} == {JobState.SENT}, [j for j in jobs if j[1] != JobState.SENT]
        assert no_eligible == {uid for uid, _ in studies} - eligible_uids
        killed = next(j for j in jobs if j[3] == chaos.killed_job)
        assert killed.attempts >= 2, "the killed worker's job must have run again"

        in_pacs = [item["MainDicomTags"]["SOPInstanceUID"] for item in pacs.request("GET", "/instances?expand")]
        # positives get 4 objects (overlay, side by side, cine, SR), negatives and OOD images 2 (overlay, SR)
        assert len(in_pacs) == len(set(in_pacs)), "a result object was stored twice"
        assert MIN_OBJECTS_PER_IMAGE * len(eligible_uids) <= len(in_pacs) <= OBJECTS_PER_IMAGE * len(eligible_uids)
        assert (len(in_pacs) - MIN_OBJECTS_PER_IMAGE * len(eligible_uids)) % 2 == 0
        assert {uid for uid, _ in sends} == set(in_pacs)

        assert status_code == 0, status  # healthy: broker, audit DB, node threads and a worker per queue
        assert status["queues"]["waiting"] == {"gpu": 0, "dicom": 0}
        assert len(status["workers"]["names"]) == 2  # the survivors: gpu-b and dicom
        assert f"gvr_instances_received_total {float(STUDIES * PER_STUDY)}" in metrics
        assert f'gvr_jobs{{state="SENT"}} {float(len(eligible_uids))}' in metrics
    finally:
        for process in reversed(processes):
            process.stop()
        audit.dispose()
        pacs.stop()

    FIGURES.instances_sent += STUDIES * PER_STUDY
    FIGURES.instances_acknowledged += len(acknowledged)
    FIGURES.instances_in_spool_and_audit += len(kept)
    FIGURES.studies += STUDIES
    FIGURES.eligible_studies += len(eligible_uids)
    FIGURES.jobs_sent += sum(1 for _, state, *_ in jobs if state == JobState.SENT)
    FIGURES.result_objects_in_pacs += len(in_pacs)
    FIGURES.duplicate_objects_in_pacs += len(in_pacs) - len(set(in_pacs))
    FIGURES.result_resends += sum(sends.values()) - len(sends)
    FIGURES.notes.append(
        f"1,000-instance run: ingest {ingest_seconds:.1f} s over {ASSOCIATIONS} associations, all settled after "
        f"{total_seconds:.1f} s; gpu worker SIGKILLed during job {chaos.killed_job} (attempts {killed.attempts}); "
        f"Redis down {chaos.redis_down_seconds:.2f} s; PostgreSQL audit DB"
    )
