"""Orthanc, the PACS of the tests, pushes a study to the node through its REST API."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

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
