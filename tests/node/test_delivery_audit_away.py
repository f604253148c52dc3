"""Delivery while the audit DB goes away: what a PACS acknowledged is recorded once the DB is back.

A private PostgreSQL is stopped for real (``pg_ctl stop``) in the middle of an
association to dcmtk's ``storescp +uf`` (a PACS that keeps every copy, slowed
to one answer every 2 s). An acknowledgement that could not be written used to
escape as an error: the job was delivered again later and the PACS stored that
object twice. Now the delivery stops sending, records the answer as soon as the
DB is back, and schedules a retry that sends only the rest.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from node.audit.migrate import upgrade
from node.audit.models import Delivery, DeliveryStatus, Job, JobState, Study, StudyState, utcnow
from node.delivery import DeliveryContext, RetryPolicy, run_delivery
from tests.node.test_results import make_fake_job
from tests.peers_servers import PostgresServer, PrivatePostgres
from tests.reliability.fault_pipeline import KeepEveryCopyPACS

DB_AWAY_S = 3.0


@pytest.fixture
def private_postgres() -> Iterator[tuple[PrivatePostgres, PostgresServer]]:
    postgres = PrivatePostgres()
    server = postgres.start()
    try:
        yield postgres, server
    finally:
        postgres.stop()


def _sent(ctx: DeliveryContext, job_id: str) -> list[str]:
    with ctx.audit.session() as session:
        return list(session.scalars(select(Delivery.sop_instance_uid).where(
            Delivery.job_id == job_id, Delivery.status == DeliveryStatus.SENT)))  # fmt: skip


def test_acknowledgement_during_an_audit_db_outage_is_recorded_and_not_sent_again(
    tmp_path: Path, make_settings: Any, private_postgres: tuple[PrivatePostgres, PostgresServer]
) -> None:
    """DB stopped after the first acknowledged object: the next answer is recorded when it returns, every
    object is stored exactly once at a PACS that keeps every copy, and the job ends SENT."""
    postgres, server = private_postgres
    pacs = KeepEveryCopyPACS(tmp_path / "pacs", sleep_after=2).start()
    url = server.url(server.create_database())
    upgrade(url)
    settings = make_settings(database_url=url, destinations=[pacs.destination])
    job = make_fake_job(settings.resolved_data_dir, job_id=str(uuid.uuid4()))
    ctx = DeliveryContext.load(settings, "test")
    with ctx.audit.session() as session:
        study = Study(study_uid=str(job.source.StudyInstanceUID), state=StudyState.ASSEMBLED)
        session.add(study)
        session.flush()
        session.add(Job(id=job.job_id, study_id=study.id, state=JobState.INFERRED, model_version="0.0.1"))
    errors: list[str] = []

    def outage() -> None:
        try:
            deadline = time.monotonic() + 60
            while not _sent(ctx, job.job_id) and time.monotonic() < deadline:
                time.sleep(0.05)
            postgres.halt()
            time.sleep(DB_AWAY_S)
            postgres.resume()
        except Exception as error:  # noqa: BLE001 - reported to the test
            errors.append(repr(error))

    chaos = threading.Thread(target=outage, name="outage", daemon=True)
    chaos.start()
    try:
        first = run_delivery(ctx, job.job_id, RetryPolicy())
        chaos.join(60)
        recorded_first = _sent(ctx, job.job_id)
        with ctx.audit.session() as session:
            session.execute(update(Job).where(Job.id == job.job_id).values(next_attempt_at=utcnow()))
        second = run_delivery(ctx, job.job_id, RetryPolicy())  # the retry the reconciler would publish
        with ctx.audit.session() as session:
            state = session.scalar(select(Job.state).where(Job.id == job.job_id))
        copies = pacs.copies()
    finally:
        ctx.audit.dispose()
        pacs.stop()

    assert errors == []
    assert first == "retry scheduled"  # sending stopped with the DB away; it did not escape as an error
    assert len(recorded_first) >= 2  # the one before the outage and the one answered during it
    assert second == "sent" and state is JobState.SENT
    assert sorted(_uid for _uid in copies) == sorted(set(recorded_first) | set(copies))
    assert set(copies.values()) == {1}, copies  # nothing acknowledged was stored twice
    assert len(copies) == 4  # overlay, side by side, cine, SR
