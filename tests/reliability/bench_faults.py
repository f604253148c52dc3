"""The longest fault scenario of issue 10, with default settings: ``make bench-faults`` runs it.

Not collected by ``make test`` (the file name is not ``test_*``): the outage alone
lasts 20 s and 25 jobs run after it. The shorter scenarios stay in the suite
(``test_delivery_killed.py``, ``test_redis_killed.py``); ``make bench-faults`` runs
all three.

The PostgreSQL audit DB (a private server, stopped for real) is down 20 s while the
gpu worker has a backlog of 25 jobs. It ends with the same checks as the others
(``fault_pipeline.Outcome.check``): acknowledged = stored = audited, every study's
one job SENT (none left QUEUED), no acknowledged result object stored twice at a
PACS that keeps every copy, and at most 60 s from the fault clearing to the last
job SENT; the figures go to the suite's summary and to docs/reliability.md.
"""

from __future__ import annotations

import time
from pathlib import Path

from node.audit.models import JobState
from tests.peers_servers import PrivatePostgres
from tests.reliability.fault_pipeline import KeepEveryCopyPACS, Pipeline, now
from tests.reliability.harness import RestartableRedis, wait_until

BACKLOG = 25
DB_DOWN_S = 20.0


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
