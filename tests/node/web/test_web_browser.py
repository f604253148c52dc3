"""The review page in a real headless Chromium (Debian's, driven by Playwright): what a reviewer does."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from playwright.sync_api import Page, expect, sync_playwright

from node.audit.models import JobState
from node.web.app import context_from, create_app
from tests.node.web.review_data import PASSWORD, USER, ReviewJob, fill, review_settings
from tests.peers import free_port, require_tool

SPECS = [(JobState.SENT, True, False), (JobState.SENT, False, False), (JobState.FAILED, True, True),
         (JobState.QUEUED, None, False)]  # fmt: skip


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, list[ReviewJob]]]:
    """``gvr web``'s app on a free loopback port, in a thread of this process."""
    settings = review_settings(tmp_path)
    jobs = fill(settings, SPECS)
    ctx = context_from(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ctx), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the review page did not start"
    yield f"http://127.0.0.1:{port}", jobs
    server.should_exit = True
    thread.join(10)
    ctx.audit.dispose()


@pytest.fixture
def page() -> Iterator[Page]:
    chromium = require_tool("chromium", "chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser.new_page(viewport={"width": 1400, "height": 1000})
        browser.close()


def test_a_reviewer_logs_in_filters_opens_a_job_and_resends(
    served: tuple[str, list[ReviewJob]], page: Page, tmp_path: Path
) -> None:
    url, jobs = served
    page.goto(f"{url}/jobs")
    expect(page).to_have_url(f"{url}/login?next=/jobs")
    page.fill("input[name=username]", USER)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    expect(page.locator("table.jobs tbody tr")).to_have_count(len(jobs))
    page.screenshot(path=tmp_path / "jobs.png", full_page=True)

    page.select_option("select[name=state]", "SENT")
    page.click("form.filters button[type=submit]")
    expect(page.locator("table.jobs tbody tr")).to_have_count(2)
    expect(page.locator("#total")).to_have_text("2")

    page.click(f"a[href='/jobs/{jobs[0].id}']")
    expect(page.locator("h1")).to_contain_text(jobs[0].id)
    expect(page.locator(".report .finding")).to_contain_text("heart failure present")
    pictures = page.locator(".pictures img")
    expect(pictures).to_have_count(3)
    for index in range(3):  # each picture loaded and decoded, not a broken-image icon
        picture = pictures.nth(index)
        expect(picture).to_have_js_property("complete", True)
        assert picture.evaluate("img => img.naturalWidth") == 96
    page.locator(".compare input[type=range]").fill("90")
    assert page.locator(".compare img.top").evaluate("img => img.style.opacity") == "0.9"
    page.check(".compare input[value=healthy]")
    expect(page.locator(".compare img.top")).to_have_attribute("src", f"/jobs/{jobs[0].id}/images/"
                                                               f"{_key(page)}/healthy.png")  # fmt: skip

    page.click("#resend")
    expect(page.locator(".flash")).to_contain_text(f"delivery of job {jobs[0].id} queued")
    event = page.locator("#timeline tr", has_text="job.resend_requested")
    expect(event).to_have_count(1)
    expect(event).to_contain_text(f"{USER}@")
    page.screenshot(path=tmp_path / "job.png", full_page=True)
    assert (tmp_path / "job.png").stat().st_size > 10_000


def _key(page: Page) -> str:
    source = page.locator(".pictures img.original").get_attribute("src") or ""
    return source.split("/images/")[1].split("/")[0]
