"""Review page benchmark: server time per page with 10,000 jobs in the audit DB.

Why: the jobs list filters and counts in SQL on every request; this checks that a
page stays well under the 100 ms target at a realistic size. A private SQLite
audit DB gets ``--jobs`` jobs (studies, instances, three events each, a result on
most) by bulk insert; each page is requested ``--repeat`` times through the real
app (FastAPI's TestClient, logged in) and timed by the app's own
``Server-Timing`` header. The peer is ``/healthz`` in the same run: the
framework's floor, so the ratio is what the page itself costs. One job also gets
1024 x 1024 spool artefacts, for the job page and its pictures (first render,
then the cache).

Run: ``make bench-web`` or ``python -m benchmarks.web [--jobs N] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import insert

from node.audit.db import AuditDB
from node.audit.models import Event, Instance, InstanceStatus, Job, JobImage, JobState, Study, StudyState
from node.study_key import study_key
from node.web.app import context_from, create_app
from tests.node.web.review_data import PASSWORD, USER, fill, review_settings

STATES = [JobState.SENT] * 14 + [JobState.FAILED] * 2 + [JobState.INFERRED, JobState.QUEUED, JobState.RUNNING]


def bulk_fill(audit: AuditDB, jobs: int, seed: int = 1) -> list[str]:
    """``jobs`` studies, instances, jobs and 3 events per job, spread over 100 days; returns study UIDs."""
    rng = random.Random(seed)
    start = datetime(2026, 8, 1, tzinfo=UTC)
    studies, instances, rows, images, events = [], [], [], [], []
    uids = []
    for n in range(jobs):
        at = start + timedelta(seconds=rng.uniform(0, 100 * 86400))
        study_uid, sop_uid = f"1.2.826.0.1.3680043.10.999.{n}", f"1.2.826.0.1.3680043.10.998.{n}"
        uids.append(study_uid)
        state = rng.choice(STATES)
        job_id = f"bench-{n:08d}"
        studies.append({"id": n + 100, "study_uid": study_uid, "state": StudyState.ASSEMBLED, "first_received_at": at,
                        "last_received_at": at, "assembled_at": at})  # fmt: skip
        instances.append({"id": n + 100, "status": InstanceStatus.ACCEPTED, "dimse_status": 0, "sop_instance_uid": sop_uid,
                          "study_uid": study_uid, "modality": "DX", "spool_path": f"/nowhere/{sop_uid}.dcm",
                          "received_at": at, "size_bytes": 2_100_000})  # fmt: skip
        positive, ood = rng.random() < 0.5, rng.random() < 0.05
        result = None if state in (JobState.QUEUED, JobState.RUNNING) else {
            "model": "gvr-demo", "version": "2.0.0", "threshold": 0.5, "device": "cpu", "seconds": 2.0,
            "images": [{"key": sop_uid, "source_sop_instance_uid": sop_uid, "probability": rng.random(),
                        "probability_healthy": 0.1, "positive": positive, "steps": 30, "ood_score": 0.02,
                        "ood_flag": ood, "estimated_bnp": None}],
        }  # fmt: skip
        rows.append({"id": job_id, "study_id": n + 100, "state": state, "attempts": 1, "created_at": at,
                     "updated_at": at, "result": result,
                     "error": "delivery failed: association rejected" if state is JobState.FAILED else None})  # fmt: skip
        images.append({"job_id": job_id, "instance_id": n + 100})  # ids after the real job's
        for kind in ("job.enqueued", "job.running", "job.inferred"):
            events.append({"kind": kind, "subject_kind": "job", "subject_id": job_id, "actor": "bench:1:node",
                           "message": kind, "at": at})  # fmt: skip
    with audit.transaction() as connection:
        for model, values in ((Study, studies), (Instance, instances), (Job, rows), (JobImage, images),
                              (Event, events)):  # fmt: skip
            connection.execute(insert(model), values)
    return uids


def timed(client: TestClient, path: str, repeat: int) -> list[float]:
    """Server milliseconds of ``repeat`` requests (after one warm-up), from the Server-Timing header."""
    client.get(path)
    times = []
    for _ in range(repeat):
        answer = client.get(path)
        if answer.status_code != 200:
            raise RuntimeError(f"{path} answered {answer.status_code}")
        times.append(float(answer.headers["server-timing"].split("dur=")[1]))
    return times


def run(jobs: int, repeat: int, folder: Path) -> list[tuple[str, float, float]]:
    settings = review_settings(folder)
    real = fill(settings, [(JobState.SENT, True, False)], size=1024)[0]  # creates the schema, and one real job
    ctx = context_from(settings)
    started = time.perf_counter()
    uids = bulk_fill(ctx.audit, jobs)
    print(f"filled {jobs} jobs in {time.perf_counter() - started:.1f} s ({settings.audit_url})")
    figures = []
    with TestClient(create_app(ctx)) as client:
        client.post("/login", data={"username": USER, "password": PASSWORD})
        pages = {
            "/healthz (peer: the framework's floor)": "/healthz",
            "jobs, first page": "/jobs",
            "jobs, page 100": "/jobs?page=100",
            "jobs, state=FAILED": "/jobs?state=FAILED",
            "jobs, finding=likely": "/jobs?finding=likely",
            "jobs, ood=yes, dates": "/jobs?ood=yes&since=2026-09-01&until=2026-09-30",
            "jobs, search study UID prefix": f"/jobs?q={uids[1234][:-2]}",
            "jobs, search study key": f"/jobs?q={study_key(uids[4321])}",
            "job page": f"/jobs/{real.id}",
            "workers": "/workers",
        }
        for name, path in pages.items():
            times = timed(client, path, repeat)
            figures.append((name, statistics.median(times), _p95(times)))
        story = client.get(f"/jobs/{real.id}").text
        key = story.split("/images/")[1].split("/")[0]
        for kind in ("original", "overlay", "healthy"):
            path = f"/jobs/{real.id}/images/{key}/{kind}.png"
            first = float(client.get(path).headers["server-timing"].split("dur=")[1])
            cached = timed(client, path, repeat)
            figures.append((f"{kind}.png 1024 px: first {first:.0f} ms, then", statistics.median(cached), _p95(cached)))
    ctx.audit.dispose()
    return figures


def _p95(times: list[float]) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs in the audit DB")
    parser.add_argument("--repeat", type=int, default=20, help="requests per page")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gvr-bench-web-") as folder:
        figures = run(args.jobs, args.repeat, Path(folder))
    floor = figures[0][1]
    print(f"\nserver time per page, {args.jobs} jobs, {args.repeat} requests each (target < 100 ms)")
    print(f"{'page':52} {'median ms':>10} {'p95 ms':>8} {'x floor':>8}")
    for name, median, p95 in figures:
        print(f"{name:52} {median:10.1f} {p95:8.1f} {median / floor:8.1f}")
    worst: Any = max(figures[1:10], key=lambda figure: figure[2])
    print(f"\nslowest page at p95: {worst[0]} {worst[2]:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
