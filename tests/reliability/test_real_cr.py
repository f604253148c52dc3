"""Real-world CR, from dcmtk's storescu through ``gvr node`` and real workers into Orthanc (issue 9's test).

Each variant of ``real_cr`` (DERIVED\\PRIMARY, MONOCHROME1, 12 bits in 16, no
ImagerPixelSpacing; JPEG 2000 lossless and lossy, PixelSpacing absent or ``0\\0``,
dashed dates, POST_PROCESSED, MONOCHROME2) is a study of its own, sent in one
storescu association. Every study must get one job that ends SENT, its SC and SR
must be in Orthanc in the source's study, each passing dciodvfy with no error,
and the SCs of the lossy source must say ``LossyImageCompression`` 01 with its ratio.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, JPEG2000Lossless
from sqlalchemy import select

from node.audit.db import AuditDB
from node.audit.models import Event, Job, JobState, Study
from tests.node.test_results import dciodvfy_errors
from tests.peers import LOOPBACK, free_port
from tests.peers_dcmtk import dcmtk_tool
from tests.peers_orthanc import Orthanc
from tests.reliability.harness import (
    FIGURES,
    PHI_ID,
    PHI_NAME,
    ManagedProcess,
    base_env,
    start_node,
    start_worker,
    wait_until,
)
from tests.reliability.real_cr import VARIANTS, write_variant

SC_CLASSES = ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.2")  # SC, multi-frame grayscale byte SC
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
WORKER_OPTIONS = ("--max-steps", "20")
BIRTH_DATES = ("1950-04-12", "19500412")  # real_cr's, dashed or not: a value, never a log line or audit text
# storescu proposes uncompressed syntaxes unless told, and never converts JPEG 2000: -xv / -xw propose it
STORESCU_PROPOSES = {ExplicitVRLittleEndian: [], JPEG2000Lossless: ["-xv"], JPEG2000: ["-xw"]}


def _jobs(audit: AuditDB) -> dict[str, tuple[JobState, str | None]]:
    with audit.session() as session:
        rows = session.execute(select(Study.study_uid, Job.state, Job.error).join(Job)).all()
    return {uid: (state, error) for uid, state, error in rows}


def _results_in_orthanc(pacs: Orthanc, study_uid: str, folder: Path) -> list[Path]:
    """The study's instances (the node's results: the source went to the node only), as Orthanc stored them."""
    found = pacs.request("POST", "/tools/lookup", study_uid.encode())
    assert found, f"study {study_uid} not in Orthanc"
    instances = pacs.request("GET", f"/studies/{found[0]['ID']}/instances")
    paths = []
    for item in instances:
        path = folder / f"{item['ID']}.dcm"
        path.write_bytes(pacs.request("GET", f"/instances/{item['ID']}/file"))
        paths.append(path)
    return paths


def test_real_cr_variants_from_storescu_to_orthanc_sent(tmp_path: Path, bundle_dir: Path) -> None:
    """Every CR variant: one job SENT; SC and SR in its Orthanc study; dciodvfy clean; lossy carried over."""
    storescu = dcmtk_tool("storescu")
    sources = {v.name: write_variant(v, tmp_path / "in", seed=700 + i, patient=(PHI_NAME, PHI_ID))
               for i, v in enumerate(VARIANTS)}  # fmt: skip
    pacs = Orthanc(tmp_path / "orthanc").start()
    env = base_env(data_dir=str(tmp_path / "data"), port=str(free_port()), bundle_dir=str(bundle_dir),
                   destinations=f"ORTHANC@{LOOPBACK}:{pacs.dicom_port}", study_stable_seconds="1.0",
                   assembler_poll_seconds="0.2", allowed_calling_aets="STORESCU", min_free_disk_mb="0")  # fmt: skip
    audit = AuditDB(f"sqlite:///{tmp_path / 'data' / 'audit.sqlite3'}")
    processes: list[ManagedProcess] = []
    try:
        processes.append(start_node(env, tmp_path / "gvr-node-cr.log"))
        processes.append(start_worker("gpu", env, tmp_path / "gvr-worker-gpu-cr.log", *WORKER_OPTIONS))
        processes.append(start_worker("dicom", env, tmp_path / "gvr-worker-dicom-cr.log"))
        for syntax, option in STORESCU_PROPOSES.items():  # one association per transfer syntax, as configured
            paths = [str(path) for ds, path in sources.values() if ds.file_meta.TransferSyntaxUID == syntax]
            sent = subprocess.run([storescu, *option, "-aet", "STORESCU", "-aec", "GVRNODE", LOOPBACK,
                                   env["GVR_PORT"], *paths], capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
            assert sent.returncode == 0, sent.stderr[-2000:]
        wait_until(lambda: len(jobs := _jobs(audit)) == len(VARIANTS)
                   and all(state in (JobState.SENT, JobState.FAILED) for state, _ in jobs.values()),
                   180, "a finished job per CR variant")  # fmt: skip
        jobs = _jobs(audit)
        downloaded = {name: _results_in_orthanc(pacs, str(ds.StudyInstanceUID), _folder(tmp_path / name))
                      for name, (ds, _) in sources.items()}  # fmt: skip
        with audit.session() as session:
            events = session.execute(select(Event.kind, Event.message, Event.details)).all()
    finally:
        for process in reversed(processes):
            process.stop()
        audit.dispose()
        pacs.stop()

    for name, (ds, _) in sources.items():
        state, error = jobs[str(ds.StudyInstanceUID)]
        assert state == JobState.SENT, f"{name}: {state} {error}"
        objects = {str(p): pydicom.dcmread(p) for p in downloaded[name]}
        classes = sorted(str(o.SOPClassUID) for o in objects.values())
        assert classes.count(SR_CLASS) == 1 and classes.count(SC_CLASSES[0]) >= 1, f"{name}: {classes}"
        for path, result in objects.items():
            assert dciodvfy_errors(Path(path)) == [], f"{name}: {result.SOPClassUID}"
            assert result.PatientID == PHI_ID and result.StudyInstanceUID == ds.StudyInstanceUID
            if result.SOPClassUID in SC_CLASSES:
                assert result.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID, name
                _assert_lossy_history(name, ds, result)
    repaired = [message for kind, message, _ in events if kind == "result.source_repaired"]
    assert any("PatientBirthDate" in message for message in repaired), repaired
    trail = " ".join(f"{message} {details}" for _, message, details in events)
    logs = " ".join(log.read_text(errors="replace") for log in tmp_path.glob("gvr-*.log"))
    for value in BIRTH_DATES:  # issue 9: the dashed birth date sat in the worker log and the audit DB
        assert value not in trail and value not in logs, value
    FIGURES.jobs_sent += len(sources)
    FIGURES.notes.append(
        f"real-world CR: {len(sources)} variants ({', '.join(sources)}) from storescu, all SENT"
    )


def _assert_lossy_history(name: str, source: pydicom.Dataset, result: pydicom.Dataset) -> None:
    if source.get("LossyImageCompression") == "01":
        assert result.LossyImageCompression == "01", name
        assert str(result.LossyImageCompressionRatio) == str(source.LossyImageCompressionRatio), name
        assert result.LossyImageCompressionMethod == "ISO_15444_1", name
    else:
        assert result.LossyImageCompression == "00", name


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
