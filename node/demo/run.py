"""The demo's steps: PACS, node, workers, phantom studies in, results out, a summary.

Everything runs on the embedded default (SQLite audit DB, SQLite broker) under one
folder, so a second run never touches the first. ``benchmarks.e2e`` reuses these steps.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from node.audit.models import Job, JobState, Study
from node.config import Peer, load_settings
from node.demo.pacs import DemoPacs, OrthancPacs, free_port, start_pacs
from node.demo.review import DEMO_USER, add_demo_user, start_web, truth_label, write_named_previews
from node.scu import FileToSend, send_files
from node.service import NodeService
from node.study_key import study_key

log = logging.getLogger(__name__)
DEMO_SEEDS_FROM = 9_000_000  # far from every seed range the demo bundle was trained or evaluated on


@dataclass
class DemoStudy:
    seed: int
    truth_positive: bool
    bnp: float
    study_uid: str
    files: list[Path]
    sent_at: float = 0.0  # monotonic time of the last C-STORE response
    reported_at: float | None = None  # monotonic time the SR was seen in the PACS

    @property
    def turnaround(self) -> float | None:
        return None if self.reported_at is None else self.reported_at - self.sent_at


@dataclass
class DemoEnvironment:
    folder: Path
    pacs: DemoPacs
    service: NodeService
    node_peer: Peer
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    keep_pacs: bool = False  # set once the run succeeded with --keep: Orthanc is left running


def make_studies(folder: Path, count: int, first_seed: int = DEMO_SEEDS_FROM) -> list[DemoStudy]:
    """Phantom studies at full size (1024 px DX), alternating positive and negative ground truth."""
    from training.phantom_dicom import phantom_dataset
    from training.phantoms import make_phantom

    folder.mkdir(parents=True, exist_ok=True)
    studies: list[DemoStudy] = []
    seed = first_seed
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


def _node_env(folder: Path, node_port: int, pacs: DemoPacs) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GVR_")}
    env.update(
        GVR_DATA_DIR=str(folder / "node"), GVR_PORT=str(node_port), GVR_BIND_ADDRESS="127.0.0.1",
        GVR_ALLOWED_CALLING_AETS="GVRSCU,ORTHANC", GVR_STUDY_STABLE_SECONDS="1", GVR_COMPLETE_ON_RELEASE="true",
        GVR_ASSEMBLER_POLL_SECONDS="0.1", GVR_DESTINATIONS=str(pacs.peer),
    )  # fmt: skip
    return env


@contextmanager
def demo_environment(folder: Path, worker_queues: list[str], keep: bool = False) -> Iterator[DemoEnvironment]:
    """A PACS, a node (in this process) and one worker process per entry of ``worker_queues``.

    An entry is ``gvr worker`` arguments after ``--queues``: "gpu,dicom", or
    "dicom --pool threads --concurrency 2"; the pool defaults to solo (no fork, quick start).
    With ``keep``, Orthanc starts in a session of its own, and is left running when the
    caller sets ``keep_pacs``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    node_port = free_port()
    node_peer = Peer(ae_title="GVRNODE", host="127.0.0.1", port=node_port)
    pacs = start_pacs(folder, node_peer, detached=keep)
    env = _node_env(folder, node_port, pacs)
    os.environ.update({k: v for k, v in env.items() if k.startswith("GVR_")})
    service = NodeService(load_settings())
    demo = DemoEnvironment(folder, pacs, service, node_peer)
    try:
        service.start()
        if inference_available():
            for index, spec in enumerate(worker_queues):
                log_file = (folder / f"worker-{index}.log").open("wb")
                arguments = spec.split()
                pool = [] if "--pool" in arguments else ["--pool", "solo"]
                command = [sys.executable, "-m", "node.cli.main", "worker", "--queues", *arguments, *pool]
                demo.workers.append(subprocess.Popen(command, env=env, stdout=log_file, stderr=log_file))
        yield demo
    finally:
        for worker in demo.workers:
            worker.terminate()
        for worker in demo.workers:
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()
        service.stop()
        if not (demo.keep_pacs and isinstance(pacs, OrthancPacs)):
            pacs.stop()


def send_study(study: DemoStudy, node_peer: Peer) -> None:
    results = send_files([FileToSend.read(p) for p in study.files], node_peer, "GVRSCU")
    study.sent_at = time.monotonic()
    if not all(r.ok for r in results):
        raise RuntimeError(f"sending phantom {study.seed} failed: {[r.status for r in results]}")


def wait_for_reports(pacs: DemoPacs, studies: list[DemoStudy], timeout: float) -> None:
    """Poll the PACS until each study holds its Structured Report (or time runs out)."""
    wait_until_arrived(studies, lambda study: pacs.has_report(study.study_uid), timeout)


def wait_until_arrived(studies: list[DemoStudy], arrived: Callable[[DemoStudy], bool], timeout: float) -> None:
    """Every 0.1 s, stamp ``reported_at`` on each sent study for which ``arrived`` holds, until all have it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = [s for s in studies if s.reported_at is None and s.sent_at]
        if not pending and all(s.sent_at for s in studies):
            return
        for study in pending:
            if arrived(study):
                study.reported_at = time.monotonic()
        time.sleep(0.1)


def jobs_by_study(service: NodeService) -> dict[str, Job]:
    with service.audit.session() as session:
        rows = session.execute(select(Study.study_uid, Job).join(Job, Job.study_id == Study.id)).all()
    return {study_uid: job for study_uid, job in rows}


def print_summary(studies: list[DemoStudy], jobs: dict[str, Job], pacs: DemoPacs) -> None:
    header = f"{'study key':9} {'truth':8} {'BNP':>6} {'p(HF)':>6}  {'finding':23} {'steps':>5} {'turnaround':>10}  sent"
    print(header)
    print("-" * (len(header) + 30))
    for study in studies:
        job = jobs.get(study.study_uid)
        key = study_key(study.study_uid)
        truth = truth_label(study.truth_positive)
        image = (((job.result if job else None) or {}).get("images") or [{}])[0]
        probability = image.get("probability")
        positive = image.get("positive")
        finding = "-" if positive is None else "heart failure " + ("likely" if positive else "unlikely")
        p = f"{probability:6.2f}" if isinstance(probability, (float, int)) else f"{'-':>6}"
        turnaround = f"{study.turnaround:9.1f}s" if study.turnaround is not None else f"{'-':>10}"
        state = job.state.value if job else "no job"
        sent = f"{state}: SC + SR -> {pacs.name}" if study.reported_at else f"{state} {job.error if job else ''}"
        print(f"{key:9} {truth:8} {study.bnp:6.0f} {p}  {finding:23} {image.get('steps', '-')!s:>5} {turnaround}  {sent}")


def run_demo(folder: Path, count: int, timeout: float, keep: bool = False) -> int:
    with demo_environment(folder, ["gpu,dicom"], keep) as demo:
        print(f"node GVRNODE on 127.0.0.1:{demo.node_peer.port}; results go to {demo.pacs.name} ({demo.pacs.peer})")
        print(f"generating {count} phantom studies (1024x1024 DX, synthetic patients) ...")
        studies = make_studies(folder / "studies", count)
        for study in studies:
            send_study(study, demo.node_peer)
        print(f"sent {len(studies)} studies by C-STORE; waiting for the Secondary Captures and Structured Reports ...")
        if not demo.workers:
            print("inference is not installed here: showing the audit trail instead")
            time.sleep(3)
            from node.cli.audit import main as audit_main

            return audit_main(["--limit", "10"])
        wait_for_reports(demo.pacs, studies, timeout)
        time.sleep(0.5)  # let the delivery worker record SENT after its last C-STORE
        jobs = jobs_by_study(demo.service)
        print()
        print_summary(studies, jobs, demo.pacs)
        written = write_previews_of(demo.service, studies, jobs, folder / "previews")
        print(f"\npreviews: {len(written)} PNG(s) in {folder / 'previews'}, named <truth>_<study key>_<picture>.png")
        ok = all(study.reported_at for study in studies)
        demo.keep_pacs = keep and ok
        print_next_steps(folder, demo, keep and ok)
        return 0 if ok else 1


def write_previews_of(service: NodeService, studies: list[DemoStudy], jobs: dict[str, Job], folder: Path) -> list[Path]:
    written = []
    for study in studies:
        job = jobs.get(study.study_uid)
        if job is not None and job.state == JobState.SENT:
            written += write_named_previews(service.spool, job.id, study.study_uid, study.truth_positive, folder)
    return written


def print_next_steps(folder: Path, demo: DemoEnvironment, keep: bool) -> None:
    """Commands that work as printed from the repository root (``.venv/bin/gvr``, absolute paths)."""
    data_dir = folder / "node"
    password = add_demo_user(data_dir / "web-users")
    env = f"GVR_DATA_DIR={data_dir}"
    print("\nnext:")
    print(f"  audit trail:  {env} .venv/bin/gvr audit")
    if not keep:
        print(f"  review page:  {env} .venv/bin/gvr web   (then http://127.0.0.1:8080/, user {DEMO_USER}, "
              f"password {password})")  # fmt: skip
        print("  keep Orthanc and the review page running after the demo: .venv/bin/gvr demo --keep")
        return
    web = start_web(data_dir, folder / "web.log")
    print(f"  review page:  {web.url}/  (user {DEMO_USER}, password {password})")
    stop = [str(web.pid)]
    if isinstance(demo.pacs, OrthancPacs):
        print(f"  Orthanc:      {demo.pacs.url}/app/explorer.html  (the results are in each study)")
        stop.append(str(demo.pacs.process.pid))
    else:
        print(f"  ({demo.pacs.name}: stopped with the demo; install orthanc to keep a PACS running)")
    print(f"  stop them:    kill {' '.join(stop)}")
