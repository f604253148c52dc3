"""What the demo leaves to look at: previews named by truth and study key, a review page left running."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx

from node.audit.models import JobState
from node.demo.review import DEMO_USER, add_demo_user, start_web, write_named_previews
from node.results.build import prepare_outbox
from node.study_key import study_key
from tests.node.test_results import make_fake_job
from tests.node.web.review_data import fill, review_settings


def test_previews_are_named_by_truth_and_study_key(tmp_path: Path) -> None:
    job = make_fake_job(tmp_path, size=128)
    prepare_outbox(job.spool, job.job_id)
    folder = tmp_path / "previews"
    paths = write_named_previews(job.spool, job.job_id, str(job.source.StudyInstanceUID), True, folder)
    key = study_key(str(job.source.StudyInstanceUID))
    assert sorted(p.name for p in paths) == [f"HF+_{key}_{picture}.png" for picture in
                                             ("cine-first", "cine-last", "overlay", "side-by-side")]  # fmt: skip
    assert sorted(folder.iterdir()) == sorted(paths)  # no scratch folder left behind


def test_the_kept_review_page_runs_on_its_own_and_lets_the_demo_user_in(tmp_path: Path) -> None:
    settings = review_settings(tmp_path)
    job = fill(settings, [(JobState.SENT, True, False)])[0]
    password = add_demo_user(settings.resolved_data_dir / "web-users")
    web = start_web(settings.resolved_data_dir, tmp_path / "web.log")
    try:
        with httpx.Client(base_url=web.url) as client:
            assert client.get("/jobs").status_code == 303
            login = client.post("/login", data={"username": DEMO_USER, "password": password})
            assert login.status_code == 303 and login.headers["location"] == "/jobs"
            page = client.get("/jobs")
            assert page.status_code == 200 and job.id in page.text and study_key(job.study_uid) in page.text
    finally:
        os.kill(web.pid, signal.SIGTERM)
        os.waitpid(web.pid, 0)
