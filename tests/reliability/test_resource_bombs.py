"""Resource bombs (``bombs.py``) against a real ``gvr node`` and a real ``gvr worker`` (issue 9, part 3).

The node must refuse each bomb with EXCEEDS_RESOURCE_LIMIT (0xC001) and a REJECTED audit
row naming the limit, from pynetdicom and from dcmtk's storescu, one at a time and all at
once, and stay small. The worker gets the same files as jobs (written to the spool behind
the node's back, as a shared mount or an older node could leave them): each job ends FAILED
with a sentence and the worker goes on to the next. Its spacing limit is raised so that
one image really runs out of memory while resampling: that image is skipped, not the worker.
Peak resident memory (VmHWM) of both processes is asserted and printed.
"""

from __future__ import annotations

import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pynetdicom import AE
from sqlalchemy import select

from node.audit.db import AuditDB
from node.audit.models import Instance, InstanceStatus, Job, JobImage, JobState, Study
from node.celery_app import QUEUE_GPU, TASK_ANALYZE, make_celery
from node.config import Settings
from node.errors import StoreStatus
from node.spool import Spool
from tests.factories import write
from tests.peers import LOOPBACK, free_port
from tests.peers_dcmtk import dcmtk_tool
from tests.reliability.bombs import Bomb, all_bombs, jpeg_bomb, spacing_bomb
from tests.reliability.harness import (
    CALLING_AE,
    FIGURES,
    ManagedProcess,
    base_env,
    phi_image,
    send_paths,
    start_node,
    start_worker,
    wait_until,
)

NODE_PEAK_LIMIT_MB = 1024
WORKER_PEAK_LIMIT_MB = 3072


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size so far (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


@pytest.fixture(scope="module", autouse=True)
def send_files_as_they_are() -> Iterator[None]:
    """pynetdicom sends a file's body unread (not decoded and re-encoded) only in chunked mode."""
    import pynetdicom._config

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
        yield


@dataclass
class Rig:
    root: Path
    node: ManagedProcess
    worker: ManagedProcess
    port: int
    settings: Settings
    audit: AuditDB


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """A node with the default limits; a gpu worker whose spacing limit is off (the MemoryError case)."""
    root = tmp_path_factory.mktemp("bombs")
    port = free_port()
    env = base_env(data_dir=str(root / "data"), port=str(port), allowed_calling_aets=f"{CALLING_AE},STORESCU",
                   min_free_disk_mb="0")  # fmt: skip
    node = start_node(env, root / "gvr-node-bombs.log")
    worker_env = {**env, "GVR_MAX_PIXEL_SPACING_RATIO": "1e12"}
    worker = start_worker("gpu", worker_env, root / "gvr-worker-gpu-bombs.log")
    settings = Settings(data_dir=root / "data")
    audit = AuditDB(settings.audit_url)
    try:
        yield Rig(root, node, worker, port, settings, audit)
    finally:
        worker.stop()
        node.stop()
        audit.dispose()


def _send(port: int, bomb: Bomb, path: Path) -> int | None:
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(bomb.sop_class, bomb.transfer_syntax)
    assoc = ae.associate(LOOPBACK, port, ae_title="GVRNODE")
    assert assoc.is_established
    try:
        response = assoc.send_c_store(path)
    finally:
        if assoc.is_established:
            assoc.release()
    return int(response.Status) if "Status" in response else None


def _rejections(audit: AuditDB, sop_instance_uid: str) -> list[Instance]:
    with audit.session() as session:
        return list(session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)))


def _assert_refused(rig: Rig, bomb: Bomb, status: int | None, copies: int = 1) -> None:
    assert status == StoreStatus.EXCEEDS_RESOURCE_LIMIT, f"{bomb.kind}: status {status}"
    rows = _rejections(rig.audit, bomb.sop_instance)
    assert [row.status for row in rows] == [InstanceStatus.REJECTED] * copies, bomb.kind
    assert all(row.dimse_status == StoreStatus.EXCEEDS_RESOURCE_LIMIT for row in rows)
    assert bomb.limit in (rows[0].reason or ""), f"{bomb.kind}: {rows[0].reason}"


def test_node_refuses_every_bomb_and_stays_small(rig: Rig, tmp_path: Path) -> None:
    bombs = all_bombs()
    peaks = {}
    for bomb in bombs:  # one at a time, from pynetdicom
        _assert_refused(rig, bomb, _send(rig.port, bomb, bomb.write(tmp_path / "one")))
        peaks[bomb.kind] = peak_rss_mb(rig.node.pid)
    again = all_bombs() + all_bombs()  # then 12 associations at once (fresh UIDs)
    statuses: dict[str, int | None] = {}
    threads = [threading.Thread(target=lambda b=b: statuses.__setitem__(b.kind + b.sop_instance,
                                                                        _send(rig.port, b, b.write(tmp_path / b.sop_instance))))
               for b in again]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for bomb in again:
        _assert_refused(rig, bomb, statuses[bomb.kind + bomb.sop_instance])
    good = send_paths(rig.port, [write(phi_image(), tmp_path / "good")])
    assert list(good.statuses.values()) == [0] and rig.node.alive()
    peak = peak_rss_mb(rig.node.pid)
    FIGURES.bad_inputs_tried += len(bombs) + len(again)
    FIGURES.bad_inputs_refused += len(bombs) + len(again)
    FIGURES.notes.append(f"node peak RSS under bombs {peak:.0f} MiB (one at a time: "
                         + ", ".join(f"{kind} {mb:.0f}" for kind, mb in peaks.items()) + "; then 12 at once)")
    assert peak < NODE_PEAK_LIMIT_MB, f"node peak RSS {peak:.0f} MiB"


def test_storescu_bombs_refused(rig: Rig, tmp_path: Path) -> None:
    """The same refusal when dcmtk sends: the JPEG bomb (proposed as JPEG baseline) and the spacing bomb."""
    storescu = dcmtk_tool("storescu")
    for bomb, options in ((jpeg_bomb(12000), ["-xy"]), (spacing_bomb(), [])):
        done = subprocess.run([storescu, *options, "-aet", "STORESCU", "-aec", "GVRNODE", LOOPBACK, str(rig.port),
                               str(bomb.write(tmp_path))], capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        rows = _rejections(rig.audit, bomb.sop_instance)
        assert rows, f"storescu sent nothing for {bomb.kind}: {done.stderr[-500:]}"
        _assert_refused(rig, bomb, rows[0].dimse_status)
    FIGURES.bad_inputs_tried += 2
    FIGURES.bad_inputs_refused += 2


def _job_for(rig: Rig, bomb: Bomb | None) -> str:
    """A QUEUED job whose one image is ``bomb``'s file in the spool (None: a file that is missing)."""
    spool = Spool(rig.settings.spool_dir)
    sop_instance, study_uid = (bomb.sop_instance, bomb.study_uid) if bomb else (str(uuid.uuid4().int), "2.25.1")
    path = spool.instance_path(study_uid, sop_instance)
    if bomb is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bomb.encoded)
    job_id = str(uuid.uuid4())
    with rig.audit.session() as session:
        study = Study(study_uid=f"{study_uid}.{uuid.uuid4().int % 10**9}")
        instance = Instance(status=InstanceStatus.DUPLICATE, dimse_status=0, sop_instance_uid=sop_instance,
                            study_uid=study.study_uid, spool_path=str(path), size_bytes=0)  # fmt: skip
        session.add_all([study, instance])
        session.flush()
        session.add(Job(id=job_id, study_id=study.id, state=JobState.QUEUED))
        session.add(JobImage(job_id=job_id, instance_id=instance.id))
    return job_id


def _job(rig: Rig, job_id: str) -> Job | None:
    with rig.audit.session() as session:
        job = session.get(Job, job_id)
        if job is not None:
            session.expunge(job)
        return job


def test_worker_fails_each_bomb_job_and_lives(rig: Rig) -> None:
    bombs = all_bombs()
    jobs = {_job_for(rig, bomb): bomb for bomb in bombs}
    app = make_celery(rig.settings)
    for job_id in jobs:
        app.send_task(TASK_ANALYZE, args=[job_id], queue=QUEUE_GPU)
    for job_id, bomb in jobs.items():
        job = wait_until(lambda j=job_id: (x := _job(rig, j)) is not None and x.state is JobState.FAILED and x,
                         90, f"job of {bomb.kind} to fail")  # fmt: skip
        error = job.error or ""
        expected = "more memory than this worker has" if bomb.kind == "pixel_spacing_1e9" else bomb.limit
        assert expected in error and "Traceback" not in error, f"{bomb.kind}: {error}"
    assert rig.worker.alive()
    after = _job_for(rig, None)  # the worker still takes jobs: a missing file fails with a sentence
    app.send_task(TASK_ANALYZE, args=[after], queue=QUEUE_GPU)
    job = wait_until(lambda: (x := _job(rig, after)) is not None and x.state is JobState.FAILED and x, 60,
                     "the job after the bombs")  # fmt: skip
    assert "cannot read the spooled file" in (job.error or "")
    peak = peak_rss_mb(rig.worker.pid)
    FIGURES.bad_inputs_tried += len(bombs)
    FIGURES.bad_inputs_refused += len(bombs)
    FIGURES.notes.append(f"gpu worker peak RSS under {len(bombs)} bomb jobs {peak:.0f} MiB, alive after")
    assert rig.worker.alive() and peak < WORKER_PEAK_LIMIT_MB, f"worker peak RSS {peak:.0f} MiB"
