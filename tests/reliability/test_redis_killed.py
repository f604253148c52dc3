"""Redis SIGKILLed mid-pipeline and started again from its append-only file, with default settings.

A job runs, others wait and one is being delivered when Redis is killed; it stays
down 5 s, so the running job finishes inference without a broker (its delivery
cannot be published: the node's reconciler publishes it). Workers reconnect by
themselves; one that exits instead is started again, as systemd's
``Restart=always`` does, and must have exited non-zero (visible), never hung.
Afterwards (``fault_pipeline.Outcome.check``): acknowledged = stored = audited,
every study's one job SENT, no acknowledged result object stored twice at a PACS
that keeps every copy, at most 60 s from Redis being back to the last job SENT.
"""

from __future__ import annotations

import time
from pathlib import Path

from node.audit.models import JobState
from tests.reliability.fault_pipeline import KeepEveryCopyPACS, Pipeline, Supervisor, now
from tests.reliability.harness import RestartableRedis, wait_until

REDIS_DOWN_S = 5.0
REDIS_STUDIES = 12


def test_redis_killed_mid_pipeline_restarted_from_its_aof(
    tmp_path: Path, private_redis: RestartableRedis, postgres_url: str, bundle_dir: Path
) -> None:
    """SIGKILL Redis while jobs run and deliver, 5 s down, restart from its AOF: every job SENT once."""
    pacs = KeepEveryCopyPACS(tmp_path / "pacs").start()
    pipeline = Pipeline(tmp_path, postgres_url, private_redis, pacs, bundle_dir)
    supervisor = Supervisor(pipeline, ("gpu", "dicom"))
    try:
        pipeline.start_all()
        supervisor.start()
        pipeline.send_studies(REDIS_STUDIES, seed=73_000)

        def mid_pipeline() -> bool:
            states = pipeline.job_states()
            return states[JobState.SENT.value] + states[JobState.INFERRED.value] >= 1 and (
                states[JobState.RUNNING.value] == 1 and states[JobState.QUEUED.value] >= 3)

        wait_until(mid_pipeline, 120, "jobs delivered, one running and more waiting", interval=0.02)
        at_kill = pipeline.job_states()
        private_redis.kill()
        time.sleep(REDIS_DOWN_S)  # the fault itself lasts this long
        private_redis.start()
        cleared = now()
        pipeline.wait_all_sent(180)
        outcome = pipeline.outcome(f"Redis SIGKILLed mid-pipeline, down {REDIS_DOWN_S:.0f} s, AOF restart", cleared)
        supervisor.stop()
        alive = {name: pipeline.processes[name].alive() for name in ("node", "gpu", "dicom")}
    finally:
        supervisor.stop()
        pipeline.stop()
        pacs.stop()
    assert supervisor.error is None, supervisor.error
    assert all(code not in (0, None) for _, code in supervisor.exits), supervisor.exits  # an exit is visible
    assert alive == {"node": True, "gpu": True, "dicom": True}, alive
    outcome.check()
    exits = ", ".join(f"{name} exited {code}" for name, code in supervisor.exits) or "no worker exited"
    outcome.notes.append(f"jobs at the kill {dict(at_kill)}; {exits}")
    outcome.record()
