"""Delivery: the job's SC and SR C-STOREd into the source's study in a real Orthanc.

A fake job result (``tests.node.test_results.make_fake_job``) on a phantom
source, a migrated SQLite audit DB with the job INFERRED, and Orthanc as the
PACS: up, down then back, behind a real Celery worker, and as a person sees
it in Orthanc Explorer (headless Chromium).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from node.audit.migrate import upgrade
from node.audit.models import (
    Delivery,
    DeliveryStatus,
    Event,
    Job,
    JobState,
    Study,
    StudyState,
    as_utc,
    utcnow,
)
from node.celery_app import QUEUE_DICOM, TASK_DELIVER, enqueue_delivery, make_celery
from node.config import Peer, Settings
from node.delivery import (
    DeliveryContext,
    DeliveryError,
    DestinationUnavailableError,
    RetryPolicy,
    deliver_job,
    run_delivery,
)
from node.reconciler import Reconciler
from node.results.build import outbox_path, read_outbox
from node.scu import FileToSend, send_files
from tests.node.test_results import FakeJob, blob_mask, make_fake_job
from tests.peers import LOOPBACK, free_port, require_tool, start_process, stop_process
from tests.peers_orthanc import Orthanc

REPO_ROOT = Path(__file__).resolve().parents[2]
OBJECTS = 4  # overlay SC, side-by-side SC, cine SC, SR


@dataclass(frozen=True)
class Delivered:
    """A job ready to deliver: its context (settings, audit DB, spool) and fake result."""

    ctx: DeliveryContext
    job: FakeJob

    @property
    def job_id(self) -> str:
        return self.job.job_id

    def state(self) -> Job:
        with self.ctx.audit.session() as session:
            job = session.get(Job, self.job_id)
            assert job is not None
            return job

    def deliveries(self) -> list[Delivery]:
        with self.ctx.audit.session() as session:
            return list(session.scalars(select(Delivery).where(Delivery.job_id == self.job_id)))

    def events(self, kind: str) -> list[Event]:
        with self.ctx.audit.session() as session:
            return list(
                session.scalars(select(Event).where(Event.kind == kind, Event.subject_id == self.job_id))
            )


@pytest.fixture
def inferred_job(make_settings: Any, tmp_path: Path) -> Iterator[Callable[..., Delivered]]:
    """Factory: ``make(destinations)`` -> a migrated audit DB holding an INFERRED job with a fake result."""
    contexts: list[DeliveryContext] = []

    def make(destinations: list[Peer]) -> Delivered:
        settings: Settings = make_settings(destinations=[str(peer) for peer in destinations])
        upgrade(settings.audit_url)
        job = make_fake_job(settings.resolved_data_dir, job_id=str(uuid.uuid4()))
        ctx = DeliveryContext.load(settings, "test")
        contexts.append(ctx)
        with ctx.audit.session() as session:
            study = Study(study_uid=str(job.source.StudyInstanceUID), state=StudyState.ASSEMBLED)
            session.add(study)
            session.flush()
            session.add(Job(id=job.job_id, study_id=study.id, state=JobState.INFERRED, model_version="0.0.1"))
        return Delivered(ctx, job)

    yield make
    for ctx in contexts:
        ctx.audit.dispose()


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    """An Orthanc with its ports chosen but NOT started: the test decides when the PACS is up."""
    require_tool("Orthanc", "orthanc")
    server = Orthanc(tmp_path / "pacs")
    try:
        yield server
    finally:
        server.stop()


def peer_of(orthanc: Orthanc) -> Peer:
    return Peer(ae_title=orthanc.aet, host=LOOPBACK, port=orthanc.dicom_port)


def study_id(orthanc: Orthanc, study_uid: str) -> str | None:
    """Orthanc's id of the study with this StudyInstanceUID, or None."""
    found = orthanc.request("POST", "/tools/lookup", study_uid.encode())
    return next((str(item["ID"]) for item in found if item["Type"] == "Study"), None)


def study_instances(orthanc: Orthanc, study_uid: str) -> list[dict[str, Any]]:
    """Orthanc's instances of the study with this StudyInstanceUID ([] when it has none)."""
    orthanc_id = study_id(orthanc, study_uid)
    return [] if orthanc_id is None else list(orthanc.request("GET", f"/studies/{orthanc_id}/instances"))


def test_deliver_job_lands_in_source_study(inferred_job: Any, orthanc: Orthanc, tmp_path: Path) -> None:
    """SCs and SR join the source's Orthanc study; SENT, audited; the overlay preview shows colour."""
    delivered = inferred_job([peer_of(orthanc)])
    source_id = orthanc.upload(delivered.job.source_path)["ID"]
    report = deliver_job(delivered.ctx, delivered.job_id)
    assert report.complete and len(report.objects) == OBJECTS
    instances = study_instances(orthanc, str(delivered.job.source.StudyInstanceUID))
    assert len(instances) == OBJECTS + 1 and len(orthanc.studies()) == 1
    assert {item["ID"] for item in instances} >= {source_id}
    assert delivered.state().state == JobState.SENT
    assert [d.status for d in delivered.deliveries()] == [DeliveryStatus.SENT] * OBJECTS
    assert all(d.dimse_status == 0 and d.attempt == 1 for d in delivered.deliveries())
    assert len(delivered.events("job.sent")) == 1
    overlay_uid = report.objects[0].sop_instance_uid
    overlay_id = next(i["ID"] for i in instances if i["MainDicomTags"]["SOPInstanceUID"] == overlay_uid)
    preview = np.asarray(Image.open(io.BytesIO(orthanc.request("GET", f"/instances/{overlay_id}/preview"))))
    Image.fromarray(preview).save(tmp_path / "orthanc-overlay-preview.png")
    size = int(delivered.job.source.Rows)
    inside = preview[:size, :size, :3].astype(int)[blob_mask(size)]
    assert np.mean(inside[:, 0] - inside[:, 2]) > 80  # Orthanc renders the rationale in colour
    _screenshot_explorer(
        orthanc, str(study_id(orthanc, str(delivered.job.source.StudyInstanceUID))), tmp_path
    )


def test_source_with_dashed_birth_date_is_delivered_and_audited_without_the_date(
    inferred_job: Any, orthanc: Orthanc, caplog: pytest.LogCaptureFixture
) -> None:
    """PatientBirthDate '1970-01-01' in the source: SENT with 19700101, one audit event, the date nowhere."""
    import pydicom
    from pydicom.dataelem import DataElement

    delivered = inferred_job([peer_of(orthanc)])
    source = pydicom.dcmread(delivered.job.source_path)
    source[0x00100030] = DataElement(0x00100030, "DA", "1970-01-01")
    source.save_as(delivered.job.source_path, enforce_file_format=True)
    orthanc.upload(delivered.job.source_path)
    caplog.clear()
    report = deliver_job(delivered.ctx, delivered.job_id)
    assert report.complete and delivered.state().state == JobState.SENT
    events = delivered.events("result.source_repaired")
    assert len(events) == 1 and "PatientBirthDate repaired" in events[0].message
    assert events[0].details == {"repairs": [{"source": str(source.SOPInstanceUID), "keyword": "PatientBirthDate",
                                             "action": "repaired", "reason": "date rewritten as YYYYMMDD"}]}  # fmt: skip
    for item in study_instances(orthanc, str(source.StudyInstanceUID)):
        tags = orthanc.request("GET", f"/instances/{item['ID']}/simplified-tags")
        if tags.get("Manufacturer") == "gvr-node":
            assert tags["PatientBirthDate"] == "19700101"
    with delivered.ctx.audit.session() as session:
        messages = [f"{e.message} {e.details}" for e in session.scalars(select(Event))]
    assert not any("1970-01-01" in text for text in [*messages, caplog.text])


def _screenshot_explorer(orthanc: Orthanc, study_id: str, tmp_path: Path) -> None:
    """Headless Chromium on Orthanc Explorer's study page; the PNG stays in tmp_path, checked not blank."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not found for the Orthanc Explorer screenshot: apt-get install -y chromium")
    png = tmp_path / "orthanc-explorer-study.png"
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000",
        f"--screenshot={png}", "--window-size=1280,900",
        f"{orthanc.url}/app/explorer.html#study?uuid={study_id}",
    ]  # fmt: skip
    subprocess.run(command, capture_output=True, timeout=90, check=False)
    assert png.is_file(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(png).convert("RGB"))
    assert pixels.shape[:2] == (900, 1280)
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # a page, not blank


def test_deliver_job_pacs_down_then_back_stores_once(inferred_job: Any, pacs: Orthanc) -> None:
    """PACS down: failed rows, still INFERRED; back: SENT; re-sending the same UIDs adds no copy."""
    delivered = inferred_job([peer_of(pacs)])
    with pytest.raises(DestinationUnavailableError, match="connection refused"):
        deliver_job(delivered.ctx, delivered.job_id)
    assert [d.status for d in delivered.deliveries()] == [DeliveryStatus.FAILED] * OBJECTS
    assert delivered.state().state == JobState.INFERRED
    pacs.start()
    pacs.upload(delivered.job.source_path)
    report = deliver_job(delivered.ctx, delivered.job_id)
    assert report.complete and report.attempt == 2
    study_uid = str(delivered.job.source.StudyInstanceUID)
    assert len(study_instances(pacs, study_uid)) == OBJECTS + 1
    entries = read_outbox(delivered.ctx.spool, delivered.job_id)
    assert entries is not None and [e.sop_instance_uid for e in entries] == [
        e.sop_instance_uid for e in report.objects
    ]
    files = [FileToSend.read(outbox_path(delivered.ctx.spool, delivered.job_id, e)) for e in entries]
    assert all(r.ok for r in send_files(files, peer_of(pacs), "GVRNODE"))  # a retry after a lost answer
    assert len(study_instances(pacs, study_uid)) == OBJECTS + 1 and len(pacs.find_instances()) == OBJECTS + 1
    forced = deliver_job(delivered.ctx, delivered.job_id, force=True)
    assert all(o.skipped for o in forced.outcomes)  # nothing sent again to a PACS that has it all


def test_run_delivery_destination_down_schedules_a_retry_in_the_db(inferred_job: Any) -> None:
    """Destination down, retries left: a due time policy.delay(n) ahead in the DB, an event, no lease held."""
    delivered = inferred_job([Peer(ae_title="NOBODY", host=LOOPBACK, port=free_port())])
    policy = RetryPolicy(max_retries=3, first_delay=2.0, max_delay=5.0)
    with delivered.ctx.audit.session() as session:
        job = session.get(Job, delivered.job_id)
        assert job is not None
        job.retries = 1  # one retry already behind it: the next waits 2 * 2**1 s
    before = utcnow()
    assert run_delivery(delivered.ctx, delivered.job_id, policy) == "retry scheduled"
    job = delivered.state()
    assert job.state == JobState.INFERRED and job.retries == 2 and job.lease_expires_at is None
    assert job.next_attempt_at is not None
    assert 4.0 <= (as_utc(job.next_attempt_at) - before).total_seconds() < 5.0
    assert policy.delay(5) == 5.0  # capped
    assert len(delivered.events("delivery.retry")) == 1
    assert run_delivery(delivered.ctx, delivered.job_id, policy) == "not due"  # a duplicate message waits


def test_run_delivery_gives_up_after_cap_then_resend_delivers(
    inferred_job: Any, pacs: Orthanc, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Out of retries: FAILED with the reason and `gvr resend`; `gvr resend --now` delivers once it is up."""
    delivered = inferred_job([peer_of(pacs)])
    policy = RetryPolicy(max_retries=2, first_delay=0.1, max_delay=0.1)
    with delivered.ctx.audit.session() as session:
        job = session.get(Job, delivered.job_id)
        assert job is not None
        job.retries = 2
    assert run_delivery(delivered.ctx, delivered.job_id, policy) == "failed"
    job = delivered.state()
    assert job.state == JobState.FAILED and job.error is not None
    assert f"gvr resend {delivered.job_id}" in job.error and "refused" in job.error
    pacs.start()
    settings = delivered.ctx.settings
    monkeypatch.setenv("GVR_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("GVR_DESTINATIONS", str(peer_of(pacs)))
    from node.cli.main import main

    assert main(["resend", delivered.job_id, "--now"]) == 0
    assert f"job {delivered.job_id}: SENT" in capsys.readouterr().out
    assert delivered.state().state == JobState.SENT and len(pacs.find_instances()) == OBJECTS


def test_deliver_job_refusals_that_retrying_cannot_fix(inferred_job: Any) -> None:
    """No destinations, or a job not yet inferred: DeliveryError (not a retry), saying what to do."""
    delivered = inferred_job([])
    with pytest.raises(DeliveryError, match="GVR_DESTINATIONS") as refused:
        deliver_job(delivered.ctx, delivered.job_id)
    assert not isinstance(refused.value, DestinationUnavailableError)
    with delivered.ctx.audit.session() as session:
        job = session.get(Job, delivered.job_id)
        assert job is not None
        job.state = JobState.RUNNING
    with pytest.raises(DeliveryError, match="is RUNNING: only an INFERRED job"):
        deliver_job(delivered.ctx, delivered.job_id, destinations=[Peer.parse("X@127.0.0.1:1")])


def test_deliver_job_sent_job_is_left_alone(inferred_job: Any) -> None:
    """A duplicate task for a SENT job sends nothing (acks_late may deliver a task twice)."""
    delivered = inferred_job([Peer(ae_title="NOBODY", host=LOOPBACK, port=free_port())])
    with delivered.ctx.audit.session() as session:
        job = session.get(Job, delivered.job_id)
        assert job is not None
        job.state = JobState.SENT
    assert deliver_job(delivered.ctx, delivered.job_id).outcomes == ()
    assert delivered.deliveries() == []


def test_retry_policy_rejects_bad_values() -> None:
    """Negative retries, zero delay or an unknown conf key are refused by name."""
    with pytest.raises(ValueError, match="max_retries"):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ValueError, match="first_delay"):
        RetryPolicy(first_delay=0)
    with pytest.raises(ValueError, match="unknown gvr_delivery option"):
        RetryPolicy.from_conf({"gvr_delivery": {"cap": 3}})


_WORKER_APP = """\
from node.celery_app import make_celery
from node.config import load_settings

app = make_celery(load_settings(), include=("node.delivery",))  # the default retry policy: 2 s, 4 s, 8 s ...
"""


def _wait_for(condition: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not seen within {timeout} s; worker log:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def test_worker_delivers_once_pacs_returns(inferred_job: Any, pacs: Orthanc, tmp_path: Path) -> None:
    """A real `celery worker -Q dicom` (sqla+sqlite broker) while the PACS is down: each retry is a due
    time in the DB that the node's reconciler (run here) publishes; SENT once the PACS is back."""
    delivered = inferred_job([peer_of(pacs)])
    settings = delivered.ctx.settings
    (tmp_path / "gvr_delivery_worker.py").write_text(_WORKER_APP)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GVR_")}
    env.update(GVR_DATA_DIR=str(settings.data_dir), GVR_DESTINATIONS=str(peer_of(pacs)),
               PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO_ROOT}", PYTHONUNBUFFERED="1")  # fmt: skip
    log = tmp_path / "worker.log"
    command = [sys.executable, "-m", "celery", "-A", "gvr_delivery_worker", "worker", "--pool", "solo",
               "-Q", QUEUE_DICOM, "--loglevel", "INFO", "--without-heartbeat", "--without-gossip",
               "--without-mingle"]  # fmt: skip
    worker = start_process(command, log, env, cwd=tmp_path)
    producer = make_celery(settings)
    reconciler = Reconciler(settings, delivered.ctx.audit, lambda job: None,
                            lambda job: enqueue_delivery(producer, job), "test:1:node")  # fmt: skip
    reconciler.start()
    try:
        producer.send_task(TASK_DELIVER, args=[delivered.job_id], queue=QUEUE_DICOM)
        _wait_for(lambda: any(d.status == DeliveryStatus.FAILED for d in delivered.deliveries()), 60,
                  "a failed delivery attempt", log)  # fmt: skip
        pacs.start()
        pacs.upload(delivered.job.source_path)
        _wait_for(lambda: delivered.state().state == JobState.SENT, 60, "job SENT", log)
    finally:
        reconciler.stop()
        stop_process(worker, timeout=15)
    study = study_instances(pacs, str(delivered.job.source.StudyInstanceUID))
    assert len(study) == OBJECTS + 1 and len(pacs.find_instances()) == OBJECTS + 1
    sent = [d for d in delivered.deliveries() if d.status == DeliveryStatus.SENT]
    assert len(sent) == OBJECTS and len({d.sop_instance_uid for d in sent}) == OBJECTS
    assert delivered.events("delivery.retry") and delivered.events("job.republished")


def test_task_failure_hook_marks_job_failed(inferred_job: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected error in the task (say, a full disk) leaves the job FAILED with the reason, not INFERRED."""
    from node.delivery import PROCESS, deliver_results

    delivered = inferred_job([Peer(ae_title="NOBODY", host=LOOPBACK, port=free_port())])
    monkeypatch.setenv("GVR_DATA_DIR", str(delivered.ctx.settings.data_dir))
    PROCESS.reset()
    try:
        deliver_results.on_failure(
            OSError(28, "No space left on device"), "task-1", [delivered.job_id], {}, None
        )
    finally:
        PROCESS.reset()
    job = delivered.state()
    assert job.state == JobState.FAILED and job.error is not None and "No space left" in job.error
    assert len(delivered.events("job.failed")) == 1


def test_resend_cli_queues_on_dicom_queue(
    inferred_job: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gvr resend JOB` without --now puts one node.deliver_results message on the broker."""
    import sqlite3

    from node.cli.main import main

    delivered = inferred_job([Peer(ae_title="NOBODY", host=LOOPBACK, port=free_port())])
    settings = delivered.ctx.settings
    monkeypatch.setenv("GVR_DATA_DIR", str(settings.data_dir))
    assert main(["resend", delivered.job_id]) == 0
    assert f"delivery of job {delivered.job_id} queued on 'dicom'" in capsys.readouterr().out
    broker = settings.celery_broker_url.removeprefix("sqla+sqlite:///")
    with sqlite3.connect(broker) as connection:
        payloads = [row[0] for row in connection.execute("SELECT payload FROM kombu_message")]
    assert len(payloads) == 1 and TASK_DELIVER in payloads[0] and delivered.job_id in payloads[0]
    assert main(["resend", delivered.job_id, "--to", "X@127.0.0.1:1"]) == 2  # --to needs --now
