"""Study assembly: eligibility, loop guard, one job per complete study, events that say why."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from node.audit.models import Event, Job, JobImage, JobState, Study, StudyState
from node.config import Peer, Settings
from node.scu import FileToSend, send_files
from node.selection import RESULT_MANUFACTURER, SelectionRule, loop_guard_reason
from tests.factories import CT_IMAGE, make_image, write


def _send(service: Any, paths: list[Path]) -> None:
    peer = Peer(ae_title="GVRNODE", host="127.0.0.1", port=service.port)
    assert all(r.ok for r in send_files([FileToSend.read(p) for p in paths], peer, "GVRSCU"))


def _wait_for_study(service: Any, study_uid: str, timeout: float = 10.0) -> Study:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with service.audit.session() as session:
            study = session.scalar(select(Study).where(Study.study_uid == study_uid))
            if study is not None and study.state != StudyState.RECEIVING:
                return study
        time.sleep(0.05)
    raise AssertionError(f"study {study_uid} was not assembled within {timeout} s")


def test_assembler_complete_study_gets_one_job_with_eligible_images(running_node: Any, tmp_path: Path) -> None:
    """Two frontal chest DX images and a lateral: one job holding the two frontal ones."""
    enqueued: list[str] = []
    service = running_node()
    service.assembler.enqueue = enqueued.append
    study_uid = generate_uid()
    images = [make_image(study_uid, seed=1), make_image(study_uid, seed=2, view=None), make_image(study_uid, view="LL")]
    _send(service, [write(ds, tmp_path) for ds in images])
    study = _wait_for_study(service, study_uid)
    assert study.state == StudyState.ASSEMBLED
    with service.audit.session() as session:
        jobs = list(session.scalars(select(Job)))
        assert len(jobs) == 1 and jobs[0].state == JobState.QUEUED
        assert len(list(session.scalars(select(JobImage)))) == 2
        event = session.scalar(select(Event).where(Event.kind == "job.queued"))
        assert event is not None and "LL" in str(event.details)
    deadline = time.monotonic() + 20
    while not enqueued and time.monotonic() < deadline:
        time.sleep(0.05)
    assert enqueued == [jobs[0].id]


def test_assembler_no_eligible_image_says_why(running_node: Any, tmp_path: Path) -> None:
    """A CT study gets no job and an event naming the modality."""
    service = running_node()
    service.assembler.enqueue = lambda job: None
    study_uid = generate_uid()
    _send(service, [write(make_image(study_uid, modality="CT", sop_class=CT_IMAGE), tmp_path)])
    study = _wait_for_study(service, study_uid)
    assert study.state == StudyState.NO_ELIGIBLE
    assert "modality 'CT'" in (study.reason or "")
    with service.audit.session() as session:
        event = session.scalar(select(Event).where(Event.kind == "study.no_eligible"))
        assert event is not None and "CT" in event.message


def test_assembler_loop_guard_skips_own_results(running_node: Any, tmp_path: Path) -> None:
    """An image that carries this node's manufacturer is never analysed again."""
    service = running_node()
    service.assembler.enqueue = lambda job: None
    study_uid = generate_uid()
    ds = make_image(study_uid)
    ds.Manufacturer = RESULT_MANUFACTURER
    _send(service, [write(ds, tmp_path)])
    study = _wait_for_study(service, study_uid)
    assert study.state == StudyState.NO_ELIGIBLE
    assert "loop guard" in (study.reason or "")


def test_assembler_broker_down_job_sent_later(running_node: Any, tmp_path: Path) -> None:
    """When the broker refuses, the job stays committed and unsent, then goes once it is back."""
    service = running_node()
    attempts: list[str] = []

    def refuse(job_id: str) -> None:
        attempts.append(job_id)
        raise ConnectionError("broker down")

    service.assembler.enqueue = refuse
    study_uid = generate_uid()
    _send(service, [write(make_image(study_uid), tmp_path)])
    _wait_for_study(service, study_uid)
    with service.audit.session() as session:
        job = session.scalar(select(Job))
        assert job is not None and job.enqueued_at is None
    sent: list[str] = []
    service.assembler.enqueue = sent.append
    deadline = time.monotonic() + 20
    while not sent and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sent == [job.id] and attempts
    while time.monotonic() < deadline:
        with service.audit.session() as session:
            if session.get(Job, job.id).enqueued_at is not None:  # type: ignore[union-attr]
                return
        time.sleep(0.05)
    raise AssertionError("the job was sent but not marked enqueued")


def test_assembler_late_instance_gets_its_own_job(running_node: Any, tmp_path: Path) -> None:
    """An image arriving after assembly is analysed once, in a new job; the first is not redone."""
    service = running_node()
    service.assembler.enqueue = lambda job: None
    study_uid = generate_uid()
    _send(service, [write(make_image(study_uid, seed=1), tmp_path)])
    _wait_for_study(service, study_uid)
    _send(service, [write(make_image(study_uid, seed=2), tmp_path)])
    time.sleep(0.1)
    _wait_for_study(service, study_uid)
    with service.audit.session() as session:
        jobs = list(session.scalars(select(Job)))
        images = list(session.scalars(select(JobImage)))
    assert len(jobs) == 2 and len(images) == 2
    assert len({image.instance_id for image in images}) == 2


def test_selection_rule_reasons() -> None:
    """The rule accepts frontal chest CR/DX and names what it rejects."""
    rule = SelectionRule()
    assert rule.reason_to_skip(make_image("1.2.3", modality="CR")) is None
    assert rule.reason_to_skip(make_image("1.2.3", body_part=None, view=None)) is None
    assert "body part" in (rule.reason_to_skip(make_image("1.2.3", body_part="KNEE")) or "")
    derived = make_image("1.2.3")
    derived.ImageType = ["DERIVED", "SECONDARY"]
    assert "DERIVED" in (rule.reason_to_skip(derived) or "")


def _typed(study_uid: str, image_type: list[str], seed: int = 0) -> Any:
    ds = make_image(study_uid, seed=seed)
    ds.ImageType = image_type
    return ds


def test_selection_rule_image_types_default_original_and_derived_primary() -> None:
    """ORIGINAL and DERIVED\\PRIMARY (processed CR) are analysed; DERIVED\\SECONDARY is not, and says so."""
    rule = SelectionRule.from_settings(Settings())
    assert rule.reason_to_skip(_typed("1.2.3", ["ORIGINAL", "PRIMARY"])) is None
    assert rule.reason_to_skip(_typed("1.2.3", ["DERIVED", "PRIMARY", "POST_PROCESSED"])) is None
    assert rule.reason_to_skip(_typed("1.2.3", ["derived", "primary"])) is None
    reason = rule.reason_to_skip(_typed("1.2.3", ["DERIVED", "SECONDARY"])) or ""
    assert "ImageType ['DERIVED', 'SECONDARY'] not in ['DERIVED\\\\PRIMARY', 'ORIGINAL']" in reason
    strict = SelectionRule.from_settings(Settings(select_image_types="ORIGINAL"))
    assert "ImageType" in (strict.reason_to_skip(_typed("1.2.3", ["DERIVED", "PRIMARY"])) or "")


def test_selection_settings_from_environment(monkeypatch: Any) -> None:
    """GVR_SELECT_* lists (comma or space separated, any case) make the rule; an empty list is refused."""
    monkeypatch.setenv("GVR_SELECT_MODALITIES", "cr, dx, rg")
    monkeypatch.setenv("GVR_SELECT_VIEW_POSITIONS", "PA")
    rule = SelectionRule.from_settings(Settings())
    assert rule.modalities == {"CR", "DX", "RG"} and rule.view_positions == {"PA"}
    assert "view position 'AP'" in (rule.reason_to_skip(make_image("1.2.3", view="AP")) or "")
    monkeypatch.setenv("GVR_SELECT_MODALITIES", " ")
    with pytest.raises(ValueError, match="select_modalities"):
        Settings()


def test_loop_guard_is_not_a_setting() -> None:
    """Settings that accept everything still never analyse SC, SR, presentation states or our own output."""
    rule = SelectionRule.from_settings(
        Settings(select_modalities="CR DX OT SR PR", select_image_types="ORIGINAL DERIVED")
    )
    for sop_class in ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.2", "1.2.840.10008.5.1.4.1.1.88.34",
                      "1.2.840.10008.5.1.4.1.1.11.1", "1.2.840.10008.5.1.4.1.1.104.1"):  # fmt: skip
        ds = make_image("1.2.3", sop_class=sop_class, modality="OT")
        assert "loop guard" in (rule.reason_to_skip(ds) or ""), sop_class
    own = make_image("1.2.3")
    own.SeriesDescription = "GVR rationale"
    assert "loop guard" in (rule.reason_to_skip(own) or "")
    vl_photo = make_image("1.2.3", sop_class="1.2.840.10008.5.1.4.1.1.77.1.4", modality="XC")
    assert loop_guard_reason(vl_photo) is None  # 1.1.77 is not a Secondary Capture (1.1.7)


def test_assembler_skip_reasons_from_settings_in_the_audit(running_node: Any, tmp_path: Path) -> None:
    """With select_image_types=ORIGINAL a DERIVED\\PRIMARY image is skipped, its reason in job.queued."""
    service = running_node(select_image_types=["ORIGINAL"])
    service.assembler.enqueue = lambda job: None
    study_uid = generate_uid()
    images = [_typed(study_uid, ["ORIGINAL", "PRIMARY"], 1), _typed(study_uid, ["DERIVED", "PRIMARY"], 2)]
    _send(service, [write(ds, tmp_path) for ds in images])
    assert _wait_for_study(service, study_uid).state == StudyState.ASSEMBLED
    with service.audit.session() as session:
        event = session.scalar(select(Event).where(Event.kind == "job.queued"))
        assert event is not None and event.details is not None
        assert event.details["skipped"] == {
            str(images[1].SOPInstanceUID): "ImageType ['DERIVED', 'PRIMARY'] not in ['ORIGINAL']"
        }


def _jobs(service: Any) -> list[Job]:
    with service.audit.session() as session:
        return list(session.scalars(select(Job).order_by(Job.created_at)))


def test_released_study_completes_after_the_short_quiet_time_not_the_long_one(running_node: Any,
                                                                              tmp_path: Path) -> None:
    """Default policy: released + release_quiet_seconds -> assembled, long before study_stable_seconds."""
    service = running_node(study_stable_seconds=3600, release_quiet_seconds=0.5)
    service.assembler.enqueue = lambda job: None
    study_uid = generate_uid()
    began = time.monotonic()
    _send(service, [write(make_image(study_uid, seed=3), tmp_path)])
    study = _wait_for_study(service, study_uid, timeout=10)
    assert study.state == StudyState.ASSEMBLED and time.monotonic() - began < 5


def test_released_study_waits_while_another_association_still_sends_it(running_node: Any, tmp_path: Path) -> None:
    """One association released, a second one still open with the same study: not complete until it ends."""
    from pynetdicom import AE

    service = running_node(study_stable_seconds=3600, release_quiet_seconds=0.2)
    service.assembler.enqueue = lambda job: None
    study_uid = generate_uid()
    first, second = (write(make_image(study_uid, seed=seed), tmp_path / str(seed)) for seed in (4, 5))
    ae = AE(ae_title="GVRSCU")
    ae.add_requested_context(FileToSend.read(second).sop_class_uid)
    held = ae.associate("127.0.0.1", service.port, ae_title="GVRNODE")
    assert held.is_established and held.send_c_store(second).Status == 0
    _send(service, [first])  # a second association: sent and released
    time.sleep(1.5)
    with service.audit.session() as session:
        assert session.scalar(select(Study.state).where(Study.study_uid == study_uid)) == StudyState.RECEIVING
    held.release()
    assert _wait_for_study(service, study_uid).state == StudyState.ASSEMBLED
    assert len(_jobs(service)) == 1


def test_late_instance_gets_its_own_job_linked_to_the_first(running_node: Any, tmp_path: Path) -> None:
    """An image arriving after the study was analysed: a second job, follows_job_id set, said in its event."""
    service = running_node(release_quiet_seconds=0.1)
    service.assembler.enqueue = lambda job: None
    study_uid = generate_uid()
    _send(service, [write(make_image(study_uid, seed=6), tmp_path / "a")])
    _wait_for_study(service, study_uid)
    _send(service, [write(make_image(study_uid, seed=7), tmp_path / "b")])
    deadline = time.monotonic() + 10
    while len(_jobs(service)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    first, late = _jobs(service)
    assert first.follows_job_id is None and late.follows_job_id == first.id
    with service.audit.session() as session:
        event = session.scalar(select(Event).where(Event.kind == "job.queued", Event.subject_id == late.id))
        assert event is not None and f"analysed in job {first.id}" in event.message
