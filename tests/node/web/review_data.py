"""An audit DB and a spool holding a few jobs, made without running the pipeline.

The spool gets a real source DICOM (``tests.factories``) and the artefacts the
inference worker writes (``node.artefacts.write_job_result``), with a rationale
blob where a positive's colour should be, so the review page renders real pictures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import generate_uid

from node.artefacts import ImageResult, JobResult, ModelInfo, write_job_result
from node.audit.db import AuditDB, add_event
from node.audit.models import Base, Instance, InstanceStatus, Job, JobImage, JobState, Study, StudyState
from node.config import Settings, load_settings
from node.spool import Spool
from node.web.auth import set_password
from tests.factories import make_image, write

USER, PASSWORD = "reviewer", "correct horse battery staple"
MODEL = ModelInfo(name="gvr-demo", version="2.0.0", threshold=0.5, rationale_scale=0.1)
SIZE = 96


@dataclass(frozen=True)
class ReviewJob:
    id: str
    study_uid: str
    state: JobState
    positive: bool | None  # None: no result
    ood: bool = False


def review_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings with data under tmp_path and a SQLite broker (nothing listens: tasks wait in its file)."""
    settings = load_settings(data_dir=tmp_path / "data", **overrides)
    set_password(settings.resolved_data_dir / "web-users", USER, PASSWORD)
    return settings


def fill(settings: Settings, specs: list[tuple[JobState, bool | None, bool]], size: int = SIZE) -> list[ReviewJob]:
    """One study and job per (state, positive, ood); jobs with a result get spool artefacts (size x size)."""
    audit = AuditDB(settings.audit_url)
    Base.metadata.create_all(audit.engine)
    spool = Spool(settings.spool_dir)
    made = []
    start = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)
    try:
        for index, (state, positive, ood) in enumerate(specs):
            made.append(_one(audit, spool, start + timedelta(days=index), state, positive, ood, index, size))
    finally:
        audit.dispose()
    return made


def _one(audit: AuditDB, spool: Spool, at: datetime, state: JobState, positive: bool | None, ood: bool,
         seed: int, size: int) -> ReviewJob:  # fmt: skip
    study_uid = generate_uid()
    ds = make_image(study_uid, size=size, seed=seed)
    path = write(ds, spool.incoming / study_uid)
    job_id = generate_uid(prefix=None).replace(".", "")[:32]
    with audit.session() as session:
        study = Study(study_uid=study_uid, state=StudyState.ASSEMBLED, first_received_at=at, last_received_at=at)
        session.add(study)
        session.flush()
        instance = Instance(status=InstanceStatus.ACCEPTED, dimse_status=0, sop_instance_uid=ds.SOPInstanceUID,
                            sop_class_uid=ds.SOPClassUID, series_uid=ds.SeriesInstanceUID, study_uid=study_uid,
                            modality="DX", spool_path=str(path), received_at=at)  # fmt: skip
        session.add(instance)
        session.flush()
        job = Job(id=job_id, study_id=study.id, state=state, attempts=1, created_at=at, updated_at=at,
                  error="delivery failed: PACS refused" if state is JobState.FAILED else None)  # fmt: skip
        session.add(job)
        session.add(JobImage(job_id=job_id, instance_id=instance.id))
        add_event(session, "job.enqueued", ("job", job_id), "test:1:node", "sent to queue gpu")
        if positive is not None:
            image = _write_result(spool, job_id, ds.SOPInstanceUID, str(path), positive, ood, size)
            job.result = {"model": MODEL.name, "version": MODEL.version, "threshold": MODEL.threshold,
                          "images": [{k: v for k, v in asdict(image).items() if k != "source_path"}]}  # fmt: skip
            add_event(session, "job.inferred", ("job", job_id), "test:2:worker", "1 image(s) explained in 2.0 s")
    return ReviewJob(job_id, study_uid, state, positive, ood)


def _write_result(spool: Spool, job_id: str, sop_uid: str, path: str, positive: bool, ood: bool,
                  size: int) -> ImageResult:  # fmt: skip
    probability = 0.9 if positive else 0.1
    image = ImageResult(key=sop_uid, source_sop_instance_uid=sop_uid, source_path=path, probability=probability,
                        probability_healthy=0.2, positive=positive, steps=30, ood_score=0.3 if ood else 0.02,
                        ood_flag=ood)  # fmt: skip
    rationale = np.zeros((size, size), np.float32)
    rationale[size * 3 // 10 : size * 6 // 10, size // 5 : size // 2] = 0.1  # a patch tinted at full colour
    write_job_result(spool.results, JobResult(job_id, MODEL, "cpu", (image,), 2.0), {sop_uid: {"rationale": rationale}})
    return image
