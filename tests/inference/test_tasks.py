"""inference.analyze_study: in-process idempotence and failures, then in a real worker process.

The worker tests start ``gvr worker`` (solo pool; prefork on SQLite) as a subprocess against the
server-less broker (kombu's SQLAlchemy transport on SQLite) and against Redis,
and wait for the audit DB to say the job is done. The kill tests SIGKILL the
worker while the job is RUNNING (a slow rationale config makes sure it is) and
start a second one: the job's lease expires and the node's reconciler (run here
in the test process) publishes it again, on either broker.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from inference.bundle import Bundle
from inference.tasks import WorkerContext, run_analysis
from node.artefacts import ARRAY_NAMES, load_array, read_job_result
from node.audit.db import AuditDB
from node.audit.models import Event, Job, JobState, as_utc, utcnow
from node.celery_app import QUEUE_DICOM, enqueue_analysis, enqueue_delivery, make_celery
from node.config import Settings, load_settings
from node.reconciler import Reconciler
from node.spool import Spool
from tests.factories import make_image
from tests.inference.jobs import create_job, spool_phantoms
from tests.peers import log_tail, start_process, stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]
SLOW = ["--max-steps", "100000", "--target", "0.000001", "--weight", "0"]


@pytest.fixture
def settings(tmp_path: Path, tiny_bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in list(os.environ):
        if name.startswith("GVR_"):
            monkeypatch.delenv(name)
    return load_settings(data_dir=tmp_path / "data", bundle_dir=tiny_bundle_dir)


@pytest.fixture
def context(settings: Settings, tiny_bundle: Bundle) -> Iterator[WorkerContext]:
    ctx = WorkerContext(settings, AuditDB(settings.audit_url), Spool(settings.spool_dir), tiny_bundle, "test:1:worker")
    yield ctx
    ctx.audit.dispose()


def wait_until_true(probe: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """The first truthy value ``probe`` returns within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing within {timeout} s")
        time.sleep(interval)
    return value


def _job(settings: Settings, seeds: list[int], extra_paths: list[Path] = ()) -> str:
    spool = Spool(settings.spool_dir)
    return create_job(settings.audit_url, spool, spool_phantoms(spool, seeds), list(extra_paths))


def _events(audit: AuditDB, job_id: str) -> list[str]:
    with audit.session() as session:
        return list(session.scalars(select(Event.kind).where(Event.subject_id == job_id).order_by(Event.id)))


def test_run_analysis_writes_artefacts_and_marks_inferred(settings: Settings, context: WorkerContext) -> None:
    """RUNNING then INFERRED with timings, model, summary; arrays on the source grid; delivery sent once."""
    job_id = _job(settings, [1, 2])
    sent: list[str] = []
    assert run_analysis(context, job_id, sent.append) == "inferred"
    assert sent == [job_id]
    with context.audit.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state is JobState.INFERRED and job.attempts == 1
        manifest = context.bundle.manifest
        assert job.started_at and job.finished_at and job.device == "cpu"
        assert job.model_version == f"{manifest.name}-{manifest.version}"
        assert job.result is not None and len(job.result["images"]) == 2
    result = read_job_result(context.spool.results, job_id)
    assert len(result.images) == 2 and result.model.version == context.bundle.manifest.version
    assert result.model.rationale_scale == context.bundle.manifest.rationale_scale  # the bundle's colour scale
    for image in result.images:
        for name in ("rationale", "reconstruction"):
            assert load_array(context.spool.results, job_id, image.key, name).shape == (96, 96)
        r = context.bundle.manifest.resolution
        assert load_array(context.spool.results, job_id, image.key, "cine").shape[1:] == (r, r)
    assert _events(context.audit, job_id) == ["job.running", "job.inferred"]


def test_run_analysis_rerun_is_idempotent(settings: Settings, context: WorkerContext) -> None:
    """INFERRED: not recomputed, nothing re-sent; a RUNNING job whose lease expired writes identical arrays."""
    job_id = _job(settings, [3])
    sent: list[str] = []
    run_analysis(context, job_id, sent.append)
    key = read_job_result(context.spool.results, job_id).images[0].key
    first = {name: load_array(context.spool.results, job_id, key, name) for name in ARRAY_NAMES}
    assert run_analysis(context, job_id, sent.append) == "done"
    assert sent == [job_id]
    with context.audit.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.state, job.worker = JobState.RUNNING, "gone:1:worker"  # the worker died after writing
        job.lease_expires_at = utcnow() + timedelta(seconds=30)
    assert run_analysis(context, job_id, sent.append) == "taken"  # its lease still runs: not ours
    with context.audit.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.lease_expires_at = utcnow() - timedelta(seconds=1)
    assert run_analysis(context, job_id, sent.append) == "inferred"
    for name in ARRAY_NAMES:
        np.testing.assert_array_equal(load_array(context.spool.results, job_id, key, name), first[name])
    assert sorted(p.name for p in (context.spool.results / job_id).iterdir()) == sorted([key, "result.json"])


def test_run_analysis_skips_unusable_and_fails_without_usable(settings: Settings, context: WorkerContext,
                                                              tmp_path: Path) -> None:
    """A too-small image and a missing file beside a good one: two image.unusable events, job INFERRED."""
    small = tmp_path / "small.dcm"
    make_image("1.2.3", size=32).save_as(small, enforce_file_format=True)
    spool = Spool(settings.spool_dir)
    ds = spool_phantoms(spool, [4])
    job_id = create_job(settings.audit_url, spool, ds, [small, tmp_path / "missing.dcm"])
    assert run_analysis(context, job_id, lambda _: None) == "inferred"
    assert _events(context.audit, job_id) == ["job.running", "job.inferred"]
    with context.audit.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.result is not None and len(job.result["skipped"]) == 2
        assert session.scalar(select(func.count()).where(Event.kind == "image.unusable")) == 2


def test_run_analysis_without_usable_image_fails(settings: Settings, context: WorkerContext, tmp_path: Path) -> None:
    """Only unusable images: FAILED with every reason, no artefacts, nothing sent."""
    small = tmp_path / "small.dcm"
    make_image("1.2.3", size=32).save_as(small, enforce_file_format=True)
    spool = Spool(settings.spool_dir)
    ds = spool_phantoms(spool, [5])
    spool.instance_path(ds[0].StudyInstanceUID, ds[0].SOPInstanceUID).unlink()
    job_id = create_job(settings.audit_url, spool, ds, [small])
    sent: list[str] = []
    assert run_analysis(context, job_id, sent.append) == "failed"
    assert sent == []
    with context.audit.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state is JobState.FAILED and job.error is not None
        assert "no usable image" in job.error and "64 px" in job.error and "cannot read" in job.error
    assert not (context.spool.results / job_id).exists()


def test_transient_error_schedules_a_retry_in_the_db(settings: Settings, context: WorkerContext,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A transient error: QUEUED with a due time (no countdown message), not a death; runs once due."""
    from inference import tasks

    job_id = _job(settings, [8])
    real = tasks._analyse
    monkeypatch.setattr(tasks, "_analyse", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    assert run_analysis(context, job_id, lambda _: None) == "retry scheduled"
    with context.audit.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state is JobState.QUEUED and job.retries == 1 and job.attempts == 1
        assert job.next_attempt_at is not None and job.lease_expires_at is None
        assert 0 < (as_utc(job.next_attempt_at) - utcnow()).total_seconds() <= tasks.retry_delay(0)
    monkeypatch.setattr(tasks, "_analyse", real)
    assert run_analysis(context, job_id, lambda _: None) == "not due"
    with context.audit.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.next_attempt_at = utcnow() - timedelta(seconds=1)
    assert run_analysis(context, job_id, lambda _: None) == "inferred"
    assert _events(context.audit, job_id) == ["job.running", "job.retry", "job.running", "job.inferred"]


def test_any_error_in_a_task_ends_the_job_failed_with_a_sentence(settings: Settings, context: WorkerContext,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A MemoryError or a bug in the task: FAILED with a sentence naming what to do, no repr, no raise."""
    from inference import tasks

    for seed, error in ((9, MemoryError()), (10, TypeError("'<' not supported between instances of 'str' and 'int'"))):
        job_id = _job(settings, [seed])
        monkeypatch.setattr(tasks, "_analyse", lambda *a, error=error: (_ for _ in ()).throw(error))
        assert run_analysis(context, job_id, lambda _: None) == "failed"
        with context.audit.session() as session:
            job = session.get(Job, job_id)
            assert job is not None and job.state is JobState.FAILED and job.error is not None
            assert job.lease_expires_at is None and f"gvr rerun {job_id}" in job.error
            assert "not supported" not in job.error  # a library message may quote data: withheld
            assert ("out of memory" in job.error) == isinstance(error, MemoryError)


# -- a real worker process -----------------------------------------------------------------------


def _worker_env(settings: Settings, broker_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GVR_")}
    env.update({"GVR_DATA_DIR": str(settings.data_dir), "GVR_BUNDLE_DIR": str(settings.bundle_dir),
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    if broker_url:
        env["GVR_BROKER_URL"] = broker_url
    return env


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Factory: start ``gvr worker --queues gpu --pool solo`` (or ``pool=``) and wait for Celery's "ready." line."""
    started: list[subprocess.Popen[bytes]] = []

    def start(env: dict[str, str], *extra: str, pool: str = "solo", timeout: float = 40.0) -> subprocess.Popen[bytes]:
        log = tmp_path / f"worker-{len(started) + 1}.log"
        command = [sys.executable, "-m", "node.cli.main", "worker", "--queues", "gpu", "--pool", pool, *extra]
        process = start_process(command, log, env, cwd=REPO_ROOT)
        started.append(process)
        deadline = time.monotonic() + timeout
        while " ready." not in (log.read_text(errors="replace") if log.exists() else ""):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not become ready:\n{log_tail(log)}")
            time.sleep(0.1)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            stop_process(process, 10.0, sig=signal.SIGQUIT)  # cold shutdown: nothing left to finish


def _wait_for_state(audit: AuditDB, job_id: str, states: set[JobState], timeout: float = 40.0) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with audit.session() as session:
            job = session.get(Job, job_id)
            if job is not None and job.state in states:
                return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach {states} in {timeout} s")


def _dicom_queue_length(broker_url: str) -> int:
    if broker_url.startswith("redis://"):
        import redis

        return int(redis.Redis.from_url(broker_url).llen(QUEUE_DICOM))
    with sqlite3.connect(broker_url.removeprefix("sqla+sqlite:///")) as connection:
        row = connection.execute(
            "SELECT count(*) FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id "
            "WHERE q.name = ? AND m.visible = 1", (QUEUE_DICOM,)).fetchone()
    return int(row[0])


def _wait_for_deliveries(broker_url: str, expected: int, timeout: float = 20.0) -> int:
    """The dicom queue's length once it reaches ``expected`` (delivery is sent just after INFERRED commits)."""
    deadline = time.monotonic() + timeout
    while (length := _dicom_queue_length(broker_url)) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return length


def _broker(request: pytest.FixtureRequest) -> str | None:
    return None if request.param == "sqla" else str(request.getfixturevalue("redis_url"))


@pytest.fixture(params=["sqla", "redis"])
def broker_url(request: pytest.FixtureRequest) -> str | None:
    """None: the settings' default server-less broker (SQLite); else a Redis DB of this test's own."""
    return _broker(request)


def test_analyze_study_in_worker_process(settings: Settings, broker_url: str | None,
                                         worker: Callable[..., Any]) -> None:
    """A real worker takes the job from the broker, writes audit rows and artefacts, queues delivery.

    On SQLite the worker forks (prefork): the job runs in the pool process, which loaded the bundle itself.
    """
    job_id = _job(settings, [6])
    env = _worker_env(settings, broker_url)
    worker_settings = load_settings(data_dir=settings.data_dir, broker_url=broker_url)
    pool = "solo" if broker_url else "prefork"
    process = worker(env, pool=pool)
    enqueue_analysis(make_celery(worker_settings), job_id)
    audit = AuditDB(settings.audit_url)
    job = _wait_for_state(audit, job_id, {JobState.INFERRED, JobState.FAILED})
    assert job.state is JobState.INFERRED, job.error
    assert job.worker is not None and job.worker.startswith("gvr-worker-")  # <Celery node name>:<pid>, as Flower
    assert (int(job.worker.rsplit(":", 1)[1]) == process.pid) == (pool == "solo")
    assert read_job_result(settings.spool_dir / "results", job_id).images[0].steps >= 0
    assert _events(audit, job_id) == ["job.running", "job.inferred"]
    assert _wait_for_deliveries(worker_settings.celery_broker_url, 1) == 1
    audit.dispose()


def test_analyze_study_worker_killed_mid_task_runs_once_more(settings: Settings, broker_url: str | None,
                                                             worker: Callable[..., Any]) -> None:
    """SIGKILL while RUNNING, start another worker: the lease expires, the reconciler publishes the job
    again, one complete re-run, one delivery. With the settings a user gets: the default job lease
    (30 s) and Redis's default visibility timeout (an hour), so the test waits out a real lease."""
    job_id = _job(settings, [7])
    env = _worker_env(settings, broker_url)
    worker_settings = load_settings(data_dir=settings.data_dir, broker_url=broker_url)
    lease = worker_settings.job_lease_seconds
    extra: list[str] = []
    first = worker(env, *SLOW, *extra)
    enqueue_analysis(make_celery(worker_settings), job_id)
    audit = AuditDB(settings.audit_url)
    running = _wait_for_state(audit, job_id, {JobState.RUNNING})
    assert running.worker is not None and int(running.worker.rsplit(":", 1)[1]) == first.pid
    os.kill(first.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    first.wait(10)
    worker(env, *extra)
    celery = make_celery(worker_settings)
    reconciler = Reconciler(worker_settings, audit, lambda job: enqueue_analysis(celery, job),
                            lambda job: enqueue_delivery(celery, job), "test:1:node")
    republished = wait_until_true(lambda: reconciler.run_once().published, timeout=lease + 30)
    # not before its lease ran out: renewed every lease / 3, so at least 2/3 of it was left at the kill
    assert time.monotonic() - killed_at >= lease * 2 / 3 - 1
    assert republished == [job_id]
    job = _wait_for_state(audit, job_id, {JobState.INFERRED, JobState.FAILED})
    assert job.state is JobState.INFERRED and job.attempts == 2, job.error
    kinds = _events(audit, job_id)
    assert kinds.count("job.running") == 2 and kinds.count("job.inferred") == 1
    result_dir = settings.spool_dir / "results" / job_id
    assert json.loads((result_dir / "result.json").read_text())["job_id"] == job_id
    assert _wait_for_deliveries(worker_settings.celery_broker_url, 1) == 1
    audit.dispose()


def test_worker_cli_refuses_bad_options() -> None:
    """An unknown queue, a zero concurrency or an invalid rationale option: exit 2 before any worker starts."""
    from inference.cli import worker as worker_cli

    assert worker_cli.main(["--queues", "gpu,video"]) == 2
    assert worker_cli.main(["--concurrency", "0"]) == 2
    assert worker_cli.main(["--weight", "-1"]) == 2


def test_a_worker_that_cannot_load_its_bundle_marks_the_job_failed(settings: Settings, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The task cannot load the bundle: FAILED with a sentence naming the bundle, in well under 2 s."""
    from inference import tasks

    job_id = _job(settings, [11])
    monkeypatch.setenv("GVR_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("GVR_BUNDLE_DIR", str(tmp_path / "no-such-bundle"))
    monkeypatch.setattr(tasks.PROCESS, "_context", None)
    began = time.monotonic()
    result = tasks.analyze_study.apply(args=[job_id])
    assert result.failed()
    audit = AuditDB(settings.audit_url)
    with audit.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state is JobState.FAILED and job.error is not None
        assert "cannot load its model bundle" in job.error and f"gvr rerun {job_id}" in job.error
    audit.dispose()
    assert time.monotonic() - began < 2.0
