"""Orthanc, the PACS of the tests, pushes a study to the node through its REST API."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid
from sqlalchemy import func, select

from node.audit.models import (
    Association,
    AssociationOutcome,
    Instance,
    InstanceStatus,
    Job,
    Study,
    StudyState,
)
from tests.factories import dataset_body, write_study


def test_orthanc_push_study_received_audited_and_assembled(running_node: Any, orthanc: Any, tmp_path: Path) -> None:
    """POST /modalities/gvr/store sends a 3-image study: all stored as sent, audited, one job."""
    service = running_node(allowed_calling_aets=["ORTHANC"])
    service.assembler.enqueue = lambda job_id: None
    orthanc.add_modality("gvr", "GVRNODE", "127.0.0.1", service.port)
    study_uid, paths = write_study(tmp_path / "study", 3)
    uploaded = [orthanc.upload(path) for path in paths]
    study_ids = {item["ParentStudy"] for item in uploaded}
    assert len(study_ids) == 1

    orthanc.store_to("gvr", list(study_ids))

    with service.audit.session() as session:
        rows = list(session.scalars(select(Instance)))
        associations = list(session.scalars(select(Association)))
    assert len(rows) == 3 and all(row.status == InstanceStatus.ACCEPTED for row in rows)
    assert {a.calling_ae for a in associations} == {"ORTHANC"}
    sent = {path.stem: path for path in paths}
    for row in rows:
        assert row.study_uid == study_uid
        spooled = Path(row.spool_path)
        assert dataset_body(spooled) == dataset_body(sent[row.sop_instance_uid])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with service.audit.session() as session:
            study = session.scalar(select(Study).where(Study.study_uid == study_uid))
            jobs = list(session.scalars(select(Job)))
            outcomes = [a.outcome for a in session.scalars(select(Association))]
        if study is not None and study.state == StudyState.ASSEMBLED and jobs:
            break
        time.sleep(0.1)
    assert study is not None and study.state == StudyState.ASSEMBLED and len(jobs) == 1
    assert outcomes == [AssociationOutcome.RELEASED]


def _associations_and_jobs(service: Any, study_uid: str) -> tuple[int, int]:
    with service.audit.session() as session:
        associations = session.scalar(
            select(func.count(func.distinct(Instance.association_id))).where(Instance.study_uid == study_uid))
        jobs = session.scalar(select(func.count(Job.id)).join(Study).where(Study.study_uid == study_uid))
    return int(associations or 0), int(jobs or 0)


def _wait_assembled(service: Any, study_uids: list[str], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with service.audit.session() as session:
            states = set(session.scalars(select(Study.state).where(Study.study_uid.in_(study_uids))))
        if states == {StudyState.ASSEMBLED}:
            return
        time.sleep(0.1)
    raise AssertionError(f"studies not assembled within {timeout} s")


def test_real_senders_split_studies_how_often_and_the_default_policy_keeps_one_job(
    running_node: Any, orthanc: Any, tmp_path: Path
) -> None:
    """With the default completion policy (released + 1 s quiet, else 30 s): Orthanc pushing a two-series
    study uses one association; dcmtk storescu run once per series uses two, back to back. Both: one job,
    assembled within seconds of the last instance (docs/reliability.md, "When is a study complete?")."""
    import subprocess

    from tests.factories import make_image, write
    from tests.peers_dcmtk import dcmtk_tool

    service = running_node(allowed_calling_aets=["ORTHANC", "STORESCU"], study_stable_seconds=30.0,
                           release_quiet_seconds=1.0)  # fmt: skip  (the defaults, said out loud)
    service.assembler.enqueue = lambda job_id: None
    orthanc.add_modality("gvr", "GVRNODE", "127.0.0.1", service.port)

    def two_series(name: str) -> tuple[str, list[list[Path]]]:
        study_uid = generate_uid()
        series = []
        for index in range(2):
            images = [make_image(study_uid, seed=10 * index + k, view=("PA", "LL")[index]) for k in range(2)]
            series_uid = generate_uid()
            for ds in images:
                ds.SeriesInstanceUID = series_uid
            series.append([write(ds, tmp_path / name / str(index)) for ds in images])
        return study_uid, series

    pushed_uid, pushed = two_series("orthanc")
    study_ids = {orthanc.upload(path)["ParentStudy"] for paths in pushed for path in paths}
    began = time.monotonic()
    orthanc.store_to("gvr", list(study_ids))
    per_series_uid, per_series = two_series("storescu")
    storescu = dcmtk_tool("storescu")
    for paths in per_series:
        subprocess.run([storescu, "-aet", "STORESCU", "-aec", "GVRNODE", "127.0.0.1", str(service.port),
                        *map(str, paths)], check=True, capture_output=True, timeout=60)  # fmt: skip
    _wait_assembled(service, [pushed_uid, per_series_uid])
    assert time.monotonic() - began < 15  # the release rule, not the 30 s quiet period
    assert _associations_and_jobs(service, pushed_uid) == (1, 1)
    assert _associations_and_jobs(service, per_series_uid) == (2, 1)
