"""The delivery worker SIGKILLed in the middle of an association, against a PACS that keeps every copy.

dcmtk ``storescp +uf --sleep-after 1`` stores each C-STORE in a file of its own
and pauses a second after each answer, so the kill lands after some objects were
acknowledged. The worker is started again at once (as systemd would); its job's
lease expires, the node's reconciler publishes it again, and the new delivery
sends only what the PACS has not acknowledged: no acknowledged object is stored
twice. The one request in flight at the kill (sent, its answer never read) may
be stored by the PACS and sent again: C-STORE cannot ask whether it arrived.
Before the kill the node is restarted (SIGKILL) while the worker delivers: the
worker's temporary files, in its own ``spool/tmp`` folder, survive the node's start.
"""

from __future__ import annotations

import socket
from pathlib import Path

from sqlalchemy import select

from node.audit.models import Job, JobState
from tests.reliability.fault_pipeline import KeepEveryCopyPACS, Pipeline, now
from tests.reliability.harness import RestartableRedis, _children, wait_until

ACKNOWLEDGED_BEFORE_KILL = 2


def test_delivery_killed_mid_association_repeats_no_acknowledged_object(
    tmp_path: Path, private_redis: RestartableRedis, postgres_url: str, bundle_dir: Path
) -> None:
    """SIGKILL the dicom worker after 2 acknowledged C-STOREs; afterwards the job is SENT, 0 repeats of them."""
    pacs = KeepEveryCopyPACS(tmp_path / "pacs", sleep_after=1).start()
    pipeline = Pipeline(tmp_path, postgres_url, private_redis, pacs, bundle_dir)
    try:
        pipeline.start_all()
        pipeline.send_studies(1, seed=71_000, frontal=2)  # one job, two images: 4 to 8 result objects

        def delivering() -> str | None:
            with pipeline.audit.session() as session:
                job_id = session.scalar(select(Job.id).where(Job.state == JobState.INFERRED))
            return job_id if job_id and len(pipeline.delivered(job_id)) >= ACKNOWLEDGED_BEFORE_KILL else None

        def building_in() -> Path | None:  # the delivering pool process's own tmp folder (node.spool)
            with pipeline.audit.session() as session:
                if session.scalar(select(Job.id).where(Job.state == JobState.INFERRED, Job.worker.is_not(None))):
                    folders = [pipeline.spool_tmp / f"worker-{socket.gethostname()}-{pid}"
                               for pid in _children(pipeline.processes["dicom"].pid)]  # fmt: skip
                    return next((folder for folder in folders if folder.is_dir()), None)
            return None

        # issue 10 (spool ownership): the node restarted while the worker builds and sends keeps its files
        partial = wait_until(building_in, 120, "a delivery under way", interval=0.05) / "result.part"
        partial.write_bytes(b"half a result object")
        pipeline.processes["node"].kill()
        pipeline.start("node")
        assert partial.read_bytes() == b"half a result object", "the node's start-up removed a live worker's file"
        job_id = wait_until(delivering, 120, "a delivery with 2 objects acknowledged", interval=0.05)
        pipeline.processes["dicom"].kill()
        acknowledged_at_kill = pipeline.delivered(job_id)
        with pipeline.audit.session() as session:
            job = session.get(Job, job_id)
            assert job is not None and job.state is JobState.INFERRED
            objects = len(job.result["images"]) if job.result else 0
        pipeline.start("dicom")
        cleared = now()
        pipeline.wait_all_sent(120)
        outcome = pipeline.outcome("delivery worker SIGKILLed mid-association (storescp +uf)", cleared)
    finally:
        pipeline.stop()
        pacs.stop()

    assert objects == 2
    assert len(acknowledged_at_kill) >= ACKNOWLEDGED_BEFORE_KILL
    assert len(acknowledged_at_kill) < len(outcome.acknowledged_objects), "the kill landed after the last object"
    outcome.check()
    twice = {uid for uid, copies in outcome.copies.items() if copies > 1}
    assert not twice & acknowledged_at_kill
    assert len(twice) <= 1 and max(outcome.copies.values()) <= 2, outcome.copies  # at most the one in flight
    outcome.notes.append(f"{len(acknowledged_at_kill)} of {len(outcome.acknowledged_objects)} objects acknowledged "
                         f"before the kill; in-flight object stored twice: {len(twice)}")  # fmt: skip
    outcome.record()
