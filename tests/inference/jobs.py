"""Audit rows and spooled phantom DICOM for an inference job, made the way the node makes them."""

from __future__ import annotations

import uuid
from pathlib import Path

import pydicom

from node.audit.db import AuditDB
from node.audit.migrate import upgrade
from node.audit.models import Instance, InstanceStatus, Job, JobImage, JobState, Study, StudyState, utcnow
from node.spool import Spool
from training.phantom_dicom import phantom_dataset
from training.phantoms import make_phantom


def spool_phantoms(spool: Spool, seeds: list[int], size: int = 96) -> list[pydicom.Dataset]:
    """Write phantom DX images of one study into the spool (the SCP's layout); returns the datasets."""
    datasets = []
    study_uid = None
    for seed in seeds:
        ds = phantom_dataset(make_phantom(seed, size))
        study_uid = study_uid or ds.StudyInstanceUID
        ds.StudyInstanceUID = study_uid
        path = spool.instance_path(study_uid, ds.SOPInstanceUID)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        datasets.append(ds)
    return datasets


def create_job(audit_url: str, spool: Spool, datasets: list[pydicom.Dataset], extra_paths: list[Path] = ()
               ) -> str:
    """Migrate the DB, add Study/Instance rows for the spooled datasets and a QUEUED Job over them."""
    upgrade(audit_url)
    audit = AuditDB(audit_url)
    try:
        with audit.session() as session:
            study = Study(study_uid=datasets[0].StudyInstanceUID, state=StudyState.ASSEMBLED, assembled_at=utcnow())
            session.add(study)
            session.flush()
            job = Job(id=str(uuid.uuid4()), study_id=study.id, state=JobState.QUEUED, enqueued_at=utcnow())
            session.add(job)
            paths = [spool.instance_path(ds.StudyInstanceUID, ds.SOPInstanceUID) for ds in datasets]
            uids = [str(ds.SOPInstanceUID) for ds in datasets]
            for i, path in enumerate(extra_paths):
                paths.append(path)
                uids.append(f"2.25.{1000 + i}")
            for uid, path in zip(uids, paths, strict=True):
                instance = Instance(status=InstanceStatus.ACCEPTED, dimse_status=0, sop_instance_uid=uid,
                                    study_uid=study.study_uid, modality="DX", spool_path=str(path))
                session.add(instance)
                session.flush()
                session.add(JobImage(job_id=job.id, instance_id=instance.id))
            return job.id
    finally:
        audit.dispose()
