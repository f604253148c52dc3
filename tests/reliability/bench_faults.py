"""The longer fault scenarios of issue 10, with default settings: ``make bench-faults`` runs them.

Not collected by ``make test`` (the file name is not ``test_*``): each one runs a
whole pipeline for one to two minutes. ``tests/reliability/test_delivery_killed.py``
and ``test_spool_owners.py`` stay in the suite.

- The PostgreSQL audit DB (a private server, stopped for real) down 20 s while the
  gpu worker has a backlog of 25 jobs.
- Redis SIGKILLed mid-pipeline and started again from its append-only file; a
  worker that exits meanwhile is started again, as systemd's ``Restart=always`` does,
  and must have exited non-zero (visible), never hung.

Each ends with the same checks (``fault_pipeline.Outcome.check``): acknowledged =
stored = audited, every study's one job SENT, no acknowledged result object stored
twice at a PACS that keeps every copy, and at most 60 s from the fault clearing to
the last job SENT; the figures go to the suite's summary and to docs/reliability.md.
"""

from __future__ import annotations

import time
from pathlib import Path

from node.audit.models import JobState
from tests.peers_servers import PrivatePostgres
from tests.reliability.fault_pipeline import KeepEveryCopyPACS, Pipeline, Supervisor, now
from tests.reliability.harness import RestartableRedis, wait_until

BACKLOG = 25
DB_DOWN_S = 20.0
REDIS_DOWN_S = 5.0
REDIS_STUDIES = 12


def test_audit_db_down_20_s_with_a_backlog(tmp_path: Path, private_redis: RestartableRedis, bundle_dir: Path) -> None:
    """PostgreSQL stopped 20 s with ~25 jobs waiting: every study SENT exactly once, none left QUEUED."""
    postgres = PrivatePostgres()
    server = postgres.start()
    pacs = KeepEveryCopyPACS(tmp_path / "pacs").start()
    try:
        pipeline = Pipeline(tmp_path, server.url(server.create_database()), private_redis, pacs, bundle_dir)
        try:
            pipeline.start_all()
            pipeline.send_studies(BACKLOG, seed=72_000)
            wait_until(lambda: sum(pipeline.job_states().values()) == BACKLOG and pipeline.job_states()[
                JobState.INFERRED.value] + pipeline.job_states()[JobState.SENT.value] >= 1, 120,
                "25 jobs, the first one inferred", interval=0.1)  # fmt: skip
            at_halt = pipeline.job_states()
            postgres.halt()
            time.sleep(DB_DOWN_S)  # the fault itself lasts this long
            postgres.resume()
            cleared = now()
            pipeline.wait_all_sent(180)
            outcome = pipeline.outcome(f"PostgreSQL down {DB_DOWN_S:.0f} s with a backlog", cleared)
        finally:
            pipeline.stop()
    finally:
        pacs.stop()
        postgres.stop()
    waiting = at_halt[JobState.QUEUED.value] + at_halt[JobState.RUNNING.value]
    assert waiting >= BACKLOG - 5, at_halt  # the backlog really was there when the DB went away
    outcome.check()
    outcome.notes.append(f"{waiting} of {BACKLOG} jobs waiting or running at the stop")
    outcome.record()


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
