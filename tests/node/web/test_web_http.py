"""The review page over plain HTTP (FastAPI's TestClient): login, filters, pictures, the audited buttons."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from node.audit.db import AuditDB
from node.audit.models import Event, Job, JobState
from node.broker_stats import queue_depths
from node.study_key import study_key
from node.web.app import context_from, create_app
from tests.node.web.review_data import PASSWORD, USER, ReviewJob, fill, review_settings

SPECS = [(JobState.SENT, True, False), (JobState.SENT, False, False), (JobState.FAILED, True, True),
         (JobState.QUEUED, None, False)]  # fmt: skip


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[TestClient, list[ReviewJob], Any]]:
    settings = review_settings(tmp_path)
    jobs = fill(settings, SPECS)
    ctx = context_from(settings)
    with TestClient(create_app(ctx), base_url="http://127.0.0.1") as client:
        yield client, jobs, settings
    ctx.audit.dispose()


def login(client: TestClient, password: str = PASSWORD, user: str = USER) -> Any:
    return client.post("/login", data={"username": user, "password": password, "next": "/jobs"},
                       follow_redirects=False)  # fmt: skip


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def test_every_page_needs_a_login_but_health_and_readiness(site: Any) -> None:
    client, jobs, _ = site
    for path in ("/jobs", "/workers", f"/jobs/{jobs[0].id}", f"/jobs/{jobs[0].id}/images/x/original.png"):
        answer = client.get(path, follow_redirects=False)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/login?next=")
    assert client.post(f"/jobs/{jobs[0].id}/resend", data={"csrf": ""}, follow_redirects=False).status_code == 303
    assert client.get("/healthz").text == "ok\n"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"ready": True, "problems": []}


def test_readyz_says_what_is_not_ready(tmp_path: Path) -> None:
    settings = review_settings(tmp_path, database_url=f"sqlite:///{tmp_path}/no/such/dir/audit.sqlite3")
    with TestClient(create_app(context_from(settings))) as client:
        answer = client.get("/readyz")
    assert answer.status_code == 503
    assert any(problem.startswith("audit DB") for problem in answer.json()["problems"])


def test_wrong_password_and_unknown_user_are_refused_alike(site: Any) -> None:
    client, _, _ = site
    for user, password in ((USER, "wrong"), ("nobody", PASSWORD)):
        answer = login(client, password, user)
        assert answer.status_code == 401
        assert "Wrong user name or password" in answer.text
    assert client.get("/jobs", follow_redirects=False).status_code == 303


def test_login_never_redirects_off_site(site: Any) -> None:
    client, _, _ = site
    answer = client.post("/login", data={"username": USER, "password": PASSWORD, "next": "//evil.example/x"},
                         follow_redirects=False)  # fmt: skip
    assert answer.headers["location"] == "/jobs"


def test_jobs_list_filters(site: Any) -> None:
    client, jobs, _ = site
    assert login(client).status_code == 303

    def listed(query: str) -> set[str]:
        page = client.get(f"/jobs?{query}")
        assert page.status_code == 200
        return {job.id for job in jobs if f"/jobs/{job.id}\"" in page.text}

    assert listed("") == {job.id for job in jobs}
    assert listed("state=SENT") == {jobs[0].id, jobs[1].id}
    assert listed("finding=likely") == {jobs[0].id}
    assert listed("finding=unlikely") == {jobs[1].id}
    assert listed("finding=none") == listed("ood=yes") == {jobs[2].id}
    assert listed("ood=no") == {jobs[0].id, jobs[1].id}
    assert listed("since=2026-11-02&until=2026-11-03") == {jobs[1].id, jobs[2].id}
    assert listed(f"q={jobs[3].study_uid}") == {jobs[3].id}
    assert listed(f"q={study_key(jobs[1].study_uid)}") == {jobs[1].id}
    assert listed(f"q={jobs[2].id[:10]}") == {jobs[2].id}
    assert "unknown state 'NOPE' ignored" in client.get("/jobs?state=NOPE").text.replace("&#39;", "'")


def test_job_page_shows_report_timeline_and_three_aligned_pictures(site: Any) -> None:
    client, jobs, _ = site
    login(client)
    page = client.get(f"/jobs/{jobs[0].id}").text
    assert "heart failure present" in page and "0.900" in page and "job.inferred" in page
    assert "instance.accepted" in page  # the instance's arrival is on the timeline
    sources = sorted(set(re.findall(r'src="(/jobs/[^"]+\.png)"', page)))
    assert [s.rsplit("/", 1)[1] for s in sources] == ["healthy.png", "original.png", "overlay.png"]
    sizes = set()
    for source in sources:
        answer = client.get(source)
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
        sizes.add(Image.open(io.BytesIO(answer.content)).size)
    assert sizes == {(96, 96)}


def test_a_negative_gets_no_colour_and_says_why(site: Any) -> None:
    client, jobs, _ = site
    login(client)
    page = client.get(f"/jobs/{jobs[1].id}").text
    assert "no rationale: prediction below threshold" in page and "overlay.png" not in page
    key = re.search(r'/images/([^/]+)/original.png', page)
    assert key
    refused = client.get(f"/jobs/{jobs[1].id}/images/{key.group(1)}/overlay.png")
    assert refused.status_code == 404 and "below threshold" in refused.text
    ood = client.get(f"/jobs/{jobs[2].id}").text
    assert "not analysed: image out of the model" in ood


def test_resend_is_audited_by_user_and_queued(site: Any) -> None:
    client, jobs, settings = site
    login(client)
    token = csrf_of(client.get(f"/jobs/{jobs[2].id}").text)
    assert client.post(f"/jobs/{jobs[2].id}/resend", data={"csrf": "forged"}, follow_redirects=False
                       ).headers["location"].startswith("/login")  # fmt: skip
    page = client.post(f"/jobs/{jobs[2].id}/resend", data={"csrf": token})
    assert "delivery of job" in page.text and "queued" in page.text
    audit = AuditDB(settings.audit_url)
    with audit.session() as session:
        events = session.scalars(select(Event).where(Event.kind == "job.resend_requested")).all()
    audit.dispose()
    assert [(e.subject_id, e.actor.split("@")[0]) for e in events] == [(jobs[2].id, USER)]
    assert queue_depths(settings.celery_broker_url).waiting["dicom"] == 1


def test_resend_of_a_queued_job_is_refused_and_rerun_requeues(site: Any) -> None:
    client, jobs, settings = site
    login(client)
    token = csrf_of(client.get(f"/jobs/{jobs[3].id}").text)
    refused = client.post(f"/jobs/{jobs[3].id}/resend", data={"csrf": token})
    assert "not done: job" in refused.text and "no results to send yet" in refused.text
    client.post(f"/jobs/{jobs[0].id}/rerun", data={"csrf": token})
    audit = AuditDB(settings.audit_url)
    with audit.session() as session:
        job = session.get(Job, jobs[0].id)
        assert job is not None and job.state is JobState.QUEUED and job.enqueued_at is not None
    audit.dispose()
    assert queue_depths(settings.celery_broker_url).waiting["gpu"] == 1


def test_workers_page_shows_queues_and_failures(site: Any) -> None:
    client, jobs, _ = site
    login(client)
    client.post(f"/jobs/{jobs[0].id}/resend", data={"csrf": csrf_of(client.get(f"/jobs/{jobs[0].id}").text)})
    page = client.get("/workers").text
    assert re.search(r"<td>dicom</td>\s*<td class=\"num\">1</td>", page)
    assert "not visible on the SQLite broker" in page  # the embedded broker has no broadcast: said, not hidden
    assert jobs[2].id[:8] in page and "PACS refused" in page
