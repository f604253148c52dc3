"""The node SIGKILLed while jobs are QUEUED and RUNNING (and a study still arriving), then restarted.

The embedded default this time (SQLite audit DB and broker): the jobs the node
had queued finish, and the study that was not yet complete at the kill is
assembled by the restarted node; every study ends with exactly one SENT job.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from sqlalchemy import select

from node.audit.db import AuditDB
from node.audit.models import Job, JobState, Study
from tests.peers import LOOPBACK, free_port
from tests.peers_orthanc import Orthanc
from tests.reliability.harness import (
    CALLING_AE,
    FIGURES,
    ManagedProcess,
    base_env,
    chest_study,
    send_paths,
    start_node,
    start_worker,
    wait_until,
)

# slow enough that a job stays RUNNING while the node is killed; still well under a second per step batch
SLOW_WORKER = ("--max-steps", "400", "--target", "0.000001", "--weight", "0")


def _jobs(audit: AuditDB) -> list[tuple[str, JobState, bool]]:
    with audit.session() as session:
        rows = session.execute(select(Study.study_uid, Job.state, Job.enqueued_at).join(Job)).all()
    return [(uid, state, enqueued is not None) for uid, state, enqueued in rows]


def test_node_killed_with_jobs_queued_and_running_all_complete(tmp_path: Path, bundle_dir: Path) -> None:
    """SIGKILL the node with 1 job RUNNING, 2 QUEUED and 1 study receiving; after restart all 4 are SENT."""
    studies = [chest_study(tmp_path / "in", 1, 1, seed=50_000 + 10 * i) for i in range(4)]
    pacs = Orthanc(tmp_path / "orthanc").start()
    env = base_env(data_dir=str(tmp_path / "data"), port=str(free_port()), bundle_dir=str(bundle_dir),
                   destinations=f"ORTHANC@{LOOPBACK}:{pacs.dicom_port}", study_stable_seconds="1.5",
                   assembler_poll_seconds="0.2", allowed_calling_aets=CALLING_AE, min_free_disk_mb="0")  # fmt: skip
    audit = AuditDB(f"sqlite:///{tmp_path / 'data' / 'audit.sqlite3'}")
    processes: list[ManagedProcess] = []
    try:
        node = start_node(env, tmp_path / "gvr-node-1.log")
        processes += [node, start_worker("dicom", env, tmp_path / "gvr-worker-dicom-restart.log")]
        for _uid, paths in studies[:3]:
            assert send_paths(int(env["GVR_PORT"]), paths).acknowledged == [p.stem for p in paths]
        wait_until(lambda: len(jobs := _jobs(audit)) == 3 and all(e for *_, e in jobs), 30, "3 jobs on the broker")
        processes.append(start_worker("gpu", env, tmp_path / "gvr-worker-gpu-restart.log", *SLOW_WORKER))
        wait_until(lambda: any(state == JobState.RUNNING for _, state, _ in _jobs(audit)), 60, "a RUNNING job",
                   interval=0.05)  # fmt: skip
        assert send_paths(int(env["GVR_PORT"]), studies[3][1]).error is None  # complete only 1.5 s from now
        node.kill()
        at_kill = Counter(state for _, state, _ in _jobs(audit))

        processes.append(start_node(env, tmp_path / "gvr-node-2.log"))  # same data dir and port
        wait_until(lambda: len(jobs := _jobs(audit)) == 4 and {s for _, s, _ in jobs} <= {JobState.SENT, JobState.FAILED},
                   120, "all four jobs to finish")  # fmt: skip
        jobs = _jobs(audit)
    finally:
        for process in reversed(processes):
            process.stop()
        audit.dispose()
        pacs.stop()

    assert at_kill[JobState.RUNNING] == 1 and at_kill[JobState.QUEUED] + at_kill[JobState.INFERRED] >= 1, at_kill
    assert Counter(uid for uid, *_ in jobs) == Counter({uid: 1 for uid, _ in studies})
    assert {state for _, state, _ in jobs} == {JobState.SENT}
    FIGURES.jobs_sent += len(jobs)
    states = {state.value: count for state, count in at_kill.items()}
    FIGURES.notes.append(f"node SIGKILL with jobs {states} + 1 study receiving: all 4 SENT after restart")
