"""`gvr rerun` and `gvr resend`: impossible transitions refused with exit 2, possible ones reset and published."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from typing import Any

import pytest

from node.audit.models import Event, Job, JobState, utcnow
from node.celery_app import TASK_ANALYZE, TASK_DELIVER
from node.cli.main import main
from node.config import Peer
from tests.node.test_delivery import inferred_job  # noqa: F401 - the fixture: a job with real results
from tests.peers import LOOPBACK, free_port


def _payloads(broker_url: str) -> list[str]:
    with sqlite3.connect(broker_url.removeprefix("sqla+sqlite:///")) as connection:
        try:
            return [row[0] for row in connection.execute("SELECT payload FROM kombu_message")]
        except sqlite3.OperationalError:  # no table: nothing was ever published
            return []


@pytest.fixture
def job(inferred_job: Any, monkeypatch: pytest.MonkeyPatch) -> Any:  # noqa: F811 - the imported fixture
    delivered = inferred_job([Peer(ae_title="NOBODY", host=LOOPBACK, port=free_port())])
    monkeypatch.setenv("GVR_DATA_DIR", str(delivered.ctx.settings.data_dir))
    return delivered


def _set(job: Any, **values: Any) -> None:
    with job.ctx.audit.session() as session:
        row = session.get(Job, job.job_id)
        assert row is not None
        for name, value in values.items():
            setattr(row, name, value)


def test_unknown_job_is_refused_by_both(job: Any, capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["rerun", "nonexistent"], ["resend", "nonexistent"], ["resend", "nonexistent", "--now"]):
        assert main(command) == 2, command
        assert "there is no job nonexistent" in capsys.readouterr().out
    assert _payloads(job.ctx.settings.celery_broker_url) == []


def test_a_job_a_worker_holds_is_refused_and_left_alone(job: Any, capsys: pytest.CaptureFixture[str]) -> None:
    _set(job, state=JobState.RUNNING, worker="w:1:worker", lease_expires_at=utcnow() + timedelta(seconds=30))
    assert main(["rerun", job.job_id]) == 2 and "right now" in capsys.readouterr().out
    assert main(["resend", job.job_id]) == 2 and "no results to send yet" in capsys.readouterr().out
    assert main(["resend", job.job_id, "--now"]) == 2 and "is RUNNING" in capsys.readouterr().out
    assert job.state().state is JobState.RUNNING and job.state().error is None  # not turned FAILED


def test_rerun_of_a_failed_job_queues_it_with_counts_reset(job: Any, capsys: pytest.CaptureFixture[str]) -> None:
    _set(job, state=JobState.FAILED, error="inference ran out of memory", attempts=3, retries=1)
    (job.ctx.spool.outbox / job.job_id).mkdir(parents=True, exist_ok=True)
    assert main(["rerun", job.job_id]) == 0
    assert f"job {job.job_id} queued for inference again" in capsys.readouterr().out
    row = job.state()
    assert row.state is JobState.QUEUED and row.attempts == 0 and row.retries == 0 and row.error is None
    assert row.enqueued_at is not None and not (job.ctx.spool.outbox / job.job_id).exists()
    payloads = _payloads(job.ctx.settings.celery_broker_url)
    assert len(payloads) == 1 and TASK_ANALYZE in payloads[0] and job.job_id in payloads[0]
    with job.ctx.audit.session() as session:
        kinds = [e.kind for e in session.query(Event).filter(Event.subject_id == job.job_id)]
    assert "job.rerun_requested" in kinds


def test_resend_of_a_failed_delivery_makes_it_inferred_and_queues_it(job: Any) -> None:
    _set(job, state=JobState.FAILED, error="delivery failed: refused", retries=8)
    assert main(["resend", job.job_id]) == 0
    row = job.state()
    assert row.state is JobState.INFERRED and row.retries == 0 and row.error is None
    payloads = _payloads(job.ctx.settings.celery_broker_url)
    assert len(payloads) == 1 and TASK_DELIVER in payloads[0]
