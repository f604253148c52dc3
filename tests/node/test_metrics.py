"""Prometheus metrics of the node: counted per C-STORE, read from the audit DB per scrape, never fatal."""

from __future__ import annotations

import socket
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from node.audit.models import Delivery, DeliveryStatus, Event, Job, JobState, Study, StudyState, utcnow
from node.celery_app import QUEUE_GPU, TASK_ANALYZE
from node.config import Peer
from node.errors import StoreStatus
from node.ingest import IngestResult
from node.metrics import NodeMetrics
from node.scu import FileToSend, send_files
from tests.factories import make_image, write
from tests.peers import LOOPBACK, direct_opener, free_port


def scrape(port: int) -> dict[str, float]:
    """``/metrics`` as {sample name with labels: value}."""
    with direct_opener().open(f"http://{LOOPBACK}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def test_metrics_count_received_and_rejected_instances(running_node: Any, tmp_path: Path) -> None:
    """Two good instances and one truncated one: received 3, rejected 1 as CANNOT_UNDERSTAND."""
    service = running_node(metrics_port=free_port())
    study = generate_uid()
    good = [write(make_image(study, seed=i), tmp_path / "good") for i in range(2)]
    bad = write(make_image(study, seed=9), tmp_path / "bad")
    bad.write_bytes(bad.read_bytes()[:-1000])  # pixel data cut short
    peer = Peer(ae_title="GVRNODE", host=LOOPBACK, port=service.port)
    results = send_files([FileToSend.read(p) for p in [*good, bad]], peer, "GVRSCU")
    assert [r.status for r in results] == [0, 0, int(StoreStatus.CANNOT_UNDERSTAND)]

    samples = scrape(service.metrics_port)
    assert samples["gvr_instances_received_total"] == 3
    assert samples["gvr_instances_rejected_total{status=CANNOT_UNDERSTAND}"] == 1


def test_metrics_jobs_by_state_turnaround_and_delivery_failures(running_node: Any) -> None:
    """Jobs and deliveries in the audit DB show up by state; a job SENT now is one turnaround sample."""
    service = running_node(metrics_port=free_port(), study_stable_seconds=3600)
    now = utcnow()
    with service.audit.session() as session:
        study = Study(study_uid=generate_uid(), state=StudyState.ASSEMBLED)
        session.add(study)
        session.flush()
        sent_id = str(uuid.uuid4())
        session.add_all([
            Job(id=sent_id, study_id=study.id, state=JobState.SENT, created_at=now - timedelta(seconds=42),
                updated_at=now),
            Job(id=str(uuid.uuid4()), study_id=study.id, state=JobState.QUEUED, enqueued_at=now),
            Job(id=str(uuid.uuid4()), study_id=study.id, state=JobState.QUEUED, enqueued_at=now),
        ])  # fmt: skip
        session.flush()
        for status in (DeliveryStatus.FAILED, DeliveryStatus.FAILED, DeliveryStatus.SENT):
            session.add(Delivery(job_id=sent_id, destination="PACS@127.0.0.1:4242", sop_instance_uid=generate_uid(),
                                 sop_class_uid="1.2.840.10008.5.1.4.1.1.7", status=status))  # fmt: skip

    samples = scrape(service.metrics_port)
    assert samples["gvr_jobs{state=SENT}"] == 1
    assert samples["gvr_jobs{state=QUEUED}"] == 2
    assert samples["gvr_jobs{state=FAILED}"] == 0
    assert samples["gvr_delivery_failures_total"] == 0  # counted per job, from events (none here)
    assert samples["gvr_deliveries_sent_total"] == 1
    assert samples["gvr_job_turnaround_seconds_count"] == 1
    assert 41 <= samples["gvr_job_turnaround_seconds_sum"] <= 43
    assert samples["gvr_job_turnaround_seconds_bucket{le=60.0}"] == 1
    assert samples["gvr_job_turnaround_seconds_bucket{le=30.0}"] == 0
    # a second scrape does not count the same job again
    assert scrape(service.metrics_port)["gvr_job_turnaround_seconds_count"] == 1


def test_metrics_port_taken_node_still_receives(running_node: Any, tmp_path: Path) -> None:
    """A metrics port already in use is logged; the SCP still starts and stores instances."""
    with socket.socket() as blocker:
        blocker.bind((LOOPBACK, 0))
        blocker.listen(1)
        service = running_node(metrics_port=blocker.getsockname()[1])
        assert service.metrics_port is None
        path = write(make_image(generate_uid()), tmp_path / "s")
        peer = Peer(ae_title="GVRNODE", host=LOOPBACK, port=service.port)
        assert send_files([FileToSend.read(path)], peer, "GVRSCU")[0].ok


def test_metrics_audit_db_gone_scrape_still_answers(tmp_path: Path) -> None:
    """With the audit DB unreachable, a scrape still serves the in-memory counters."""
    from node.audit.db import AuditDB

    audit = AuditDB(f"sqlite:///{tmp_path / 'missing' / 'no.sqlite3'}")  # folder absent: cannot open
    metrics = NodeMetrics(audit)
    metrics.count_store(IngestResult(StoreStatus.SUCCESS))
    port = metrics.serve(LOOPBACK, free_port())
    assert port is not None
    try:
        samples = scrape(port)
    finally:
        metrics.stop()
        audit.dispose()
    assert samples["gvr_instances_received_total"] == 1
    assert "gvr_jobs{state=SENT}" not in samples


def test_metrics_count_store_never_raises() -> None:
    """A status outside the enum is counted by its hex value instead of raising into the SCP."""
    metrics = NodeMetrics()
    metrics.count_store(IngestResult(0xB000))  # type: ignore[arg-type]
    value = metrics.registry.get_sample_value("gvr_instances_rejected_total", {"status": "0xB000"})
    assert value == 1


def _job_with_events(session: Any, study_id: int, state: JobState, events: list[tuple[str, float, str]]) -> str:
    """A job in ``state`` and its trail: (kind, seconds after a start 100 s ago, actor)."""
    job_id, start = str(uuid.uuid4()), utcnow() - timedelta(seconds=100)
    session.add(Job(id=job_id, study_id=study_id, state=state))
    for kind, offset, actor in events:
        session.add(Event(at=start + timedelta(seconds=offset), kind=kind, subject_kind="job", subject_id=job_id,
                          actor=actor, message=kind))  # fmt: skip
    return job_id


def test_metrics_queue_depth_durations_and_failures_per_job(running_node: Any) -> None:
    """Queue depth from the broker; durations from event pairs, once; FAILED by cause; failures per job."""
    service = running_node(metrics_port=free_port(), study_stable_seconds=3600)
    service.celery.send_task(TASK_ANALYZE, args=["not-a-job"], queue=QUEUE_GPU)
    first = scrape(service.metrics_port)  # history before this scrape is not observed
    assert first["gvr_queue_depth{queue=gpu}"] == 1 and first["gvr_queue_depth{queue=dicom}"] == 0
    assert not any(name.startswith("gvr_workers_alive") for name in first)  # SQLite broker: unknown, not 0
    worker, node = "host:1:worker", "host:2:node"
    with service.audit.session() as session:
        study = Study(study_uid=generate_uid(), state=StudyState.ASSEMBLED)
        session.add(study)
        session.flush()
        _job_with_events(session, study.id, JobState.SENT,
                         [("job.running", 0, worker), ("job.inferred", 7, worker), ("job.sent", 9, worker)])
        _job_with_events(session, study.id, JobState.FAILED,
                         [("job.running", 0, worker), ("job.inferred", 3, worker), ("delivery.retry", 4, worker),
                          ("delivery.retry", 5, worker), ("job.failed", 6, worker)])
        _job_with_events(session, study.id, JobState.FAILED, [("job.running", 0, worker), ("job.failed", 1, node)])
        _job_with_events(session, study.id, JobState.FAILED, [("job.running", 0, worker), ("job.failed", 1, worker)])

    samples = scrape(service.metrics_port)
    assert samples["gvr_inference_duration_seconds_count"] == 2
    assert samples["gvr_inference_duration_seconds_sum"] == 10
    assert samples["gvr_delivery_duration_seconds_count"] == 1
    assert samples["gvr_delivery_duration_seconds_sum"] == 2
    assert samples["gvr_jobs_failed{cause=delivery}"] == 1
    assert samples["gvr_jobs_failed{cause=abandoned}"] == 1
    assert samples["gvr_jobs_failed{cause=inference}"] == 1
    assert samples["gvr_delivery_failures_total"] == 1  # two retries and a FAILED end: one job
    again = scrape(service.metrics_port)
    assert again["gvr_inference_duration_seconds_count"] == 2 and again["gvr_delivery_duration_seconds_count"] == 1
