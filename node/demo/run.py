"""The demo's steps: PACS, node, worker, phantom studies in, results out, a summary.

Everything runs on the embedded default (SQLite audit DB, SQLite broker) under one
folder, so a second run never touches the first.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import select

from node.audit.models import Job, JobState, Study
from node.config import Peer, load_settings
from node.demo.pacs import DemoPacs, free_port, start_pacs
from node.scu import FileToSend, send_files
from node.service import NodeService

log = logging.getLogger(__name__)
DEMO_SEEDS_FROM = 9_000_000  # far from every seed range the demo bundle was trained or evaluated on
TERMINAL = (JobState.SENT, JobState.FAILED)


@dataclass
class DemoStudy:
    seed: int
    truth_positive: bool
    bnp: float
    study_uid: str
    files: list[Path]
    sent_at: float = 0.0


def make_studies(folder: Path, count: int) -> list[DemoStudy]:
    """Phantom studies at full size, alternating positive and negative ground truth."""
    from training.phantom_dicom import phantom_dataset
    from training.phantoms import make_phantom

    folder.mkdir(parents=True, exist_ok=True)
    studies: list[DemoStudy] = []
    seed = DEMO_SEEDS_FROM
    while len(studies) < count:
        want_positive = len(studies) % 2 == 0
        while make_phantom(seed, size=64).label != want_positive:
            seed += 1
        phantom = make_phantom(seed, size=1024)
        ds = phantom_dataset(phantom)
        path = folder / f"phantom-{seed}.dcm"
        ds.save_as(path, enforce_file_format=True)
        studies.append(DemoStudy(seed, phantom.label, phantom.bnp, str(ds.StudyInstanceUID), [path]))
        seed += 1
    return studies


def inference_available() -> bool:
    return importlib.util.find_spec("inference.cli.worker") is not None


def start_worker(folder: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """One worker for both queues (two cores: one job at a time is the fastest here)."""
    log_file = (folder / "worker.log").open("wb")
    command = [sys.executable, "-m", "node.cli.main", "worker", "--queues", "gpu,dicom", "--pool", "solo"]
    return subprocess.Popen(command, env=env, stdout=log_file, stderr=log_file)


def wait_for_jobs(service: NodeService, studies: list[DemoStudy], timeout: float) -> dict[str, Job]:
    """Poll the audit DB until every study's job is SENT or FAILED; returns study UID -> job."""
    deadline = time.monotonic() + timeout
    done: dict[str, Job] = {}
    while time.monotonic() < deadline and len(done) < len(studies):
        with service.audit.session() as session:
            rows = session.execute(select(Study.study_uid, Job).join(Job, Job.study_id == Study.id)).all()
        for study_uid, job in rows:
            if job.state in TERMINAL and study_uid not in done:
                done[study_uid] = job
                job.finished_at = job.finished_at or job.updated_at
                _note_turnaround(studies, study_uid)
        time.sleep(0.2)
    return done


_finished: dict[str, float] = {}


def _note_turnaround(studies: list[DemoStudy], study_uid: str) -> None:
    _finished.setdefault(study_uid, time.monotonic())


def write_previews(outbox: Path, job_id: str, target: Path) -> list[Path]:
    """PNG copies of the Secondary Captures sent for a job, for a quick look."""
    import pydicom

    written = []
    for path in sorted((outbox / job_id).glob("*.dcm")):
        ds = pydicom.dcmread(path)
        if not str(ds.SOPClassUID).startswith("1.2.840.10008.5.1.4.1.1.7") or "PixelData" not in ds:
            continue
        pixels = ds.pixel_array
        frame = pixels[len(pixels) // 2] if int(ds.get("NumberOfFrames", 1) or 1) > 1 else pixels
        out = target / f"{job_id[:8]}-{path.stem[-12:]}.png"
        Image.fromarray(np.asarray(frame, dtype=np.uint8)).save(out)
        written.append(out)
    return written


def print_summary(studies: list[DemoStudy], jobs: dict[str, Job], pacs: DemoPacs) -> None:
    header = f"{'study':10} {'truth':9} {'BNP':>6} {'p(HF)':>6} {'finding':24} {'steps':>5} {'turnaround':>10}  sent"
    print(header)
    print("-" * len(header))
    for study in studies:
        job = jobs.get(study.study_uid)
        key = hashlib.sha256(study.study_uid.encode()).hexdigest()[:8]
        truth = "positive" if study.truth_positive else "negative"
        if job is None:
            print(f"{key:10} {truth:9} {study.bnp:6.0f} {'-':>6} {'(no result in time)':24}")
            continue
        image = ((job.result or {}).get("images") or [{}])[0]
        probability = image.get("probability")
        finding = image.get("finding") or ("heart failure likely" if image.get("positive") else "-")
        turnaround = _finished.get(study.study_uid, time.monotonic()) - study.sent_at
        sent = f"{(job.result or {}).get('objects_sent', '?')} object(s) -> {pacs.name}" if job.state == JobState.SENT else f"FAILED: {job.error}"
        p = f"{probability:6.2f}" if isinstance(probability, float) else f"{'-':>6}"
        print(f"{key:10} {truth:9} {study.bnp:6.0f} {p} {finding:24} {image.get('steps', '-')!s:>5} {turnaround:9.1f}s  {sent}")


def run_demo(folder: Path, count: int, timeout: float) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    node_port = free_port()
    node_peer = Peer(ae_title="GVRNODE", host="127.0.0.1", port=node_port)
    pacs = start_pacs(folder, node_peer)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GVR_")}
    env.update(
        GVR_DATA_DIR=str(folder / "node"), GVR_PORT=str(node_port), GVR_BIND_ADDRESS="127.0.0.1",
        GVR_ALLOWED_CALLING_AETS="GVRSCU,ORTHANC", GVR_STUDY_STABLE_SECONDS="1", GVR_COMPLETE_ON_RELEASE="true",
        GVR_ASSEMBLER_POLL_SECONDS="0.2", GVR_DESTINATIONS=str(pacs.peer),
    )  # fmt: skip
    os.environ.update({k: v for k, v in env.items() if k.startswith("GVR_")})
    service = NodeService(load_settings())
    worker = None
    try:
        service.start()
        print(f"node GVRNODE listening on 127.0.0.1:{node_port}; results go to {pacs.name} ({pacs.peer})")
        if inference_available():
            worker = start_worker(folder, env)
        print(f"generating {count} phantom studies (1024x1024 DX, synthetic patients) ...")
        studies = make_studies(folder / "studies", count)
        for study in studies:
            results = send_files([FileToSend.read(p) for p in study.files], node_peer, "GVRSCU")
            study.sent_at = time.monotonic()
            if not all(r.ok for r in results):
                print(f"sending study {study.seed} failed: {[r.status for r in results]}")
                return 1
        print(f"sent {len(studies)} studies by C-STORE; waiting for predictions and results ...")
        if worker is None:
            print("inference is not installed here: showing the audit trail instead")
            time.sleep(3)
            from node.cli.audit import main as audit_main

            return audit_main(["--limit", "10"])
        jobs = wait_for_jobs(service, studies, timeout)
        print()
        print_summary(studies, jobs, pacs)
        previews = folder / "previews"
        previews.mkdir(exist_ok=True)
        written = [p for job in jobs.values() for p in write_previews(service.spool.outbox, job.id, previews)]
        print(f"\npreviews: {len(written)} PNG(s) in {previews}; audit trail: gvr audit (GVR_DATA_DIR={folder / 'node'})")
        ok = len(jobs) == len(studies) and all(job.state == JobState.SENT for job in jobs.values())
        return 0 if ok else 1
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
        service.stop()
        pacs.stop()
