"""Screenshots of the review page for docs/: the jobs list, a positive job, the workers page.

Run against a review page that holds real results, e.g. the one `gvr demo --keep` leaves:
    .venv/bin/python scripts/web-screenshots.py http://127.0.0.1:PORT demo PASSWORD
The password is read from the third argument only because this is a throwaway demo user.
Needs Debian's chromium (Playwright's own browser download cannot work offline).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

DOCS = Path(__file__).resolve().parents[1] / "docs"


def main(url: str, user: str, password: str) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{url}/login")
        page.fill("input[name=username]", user)
        page.fill("input[name=password]", password)
        page.click("button[type=submit]")
        page.wait_for_selector("table.jobs")
        page.screenshot(path=DOCS / "web-jobs.png")
        page.goto(f"{url}/jobs?finding=likely")
        page.click("table.jobs tbody tr a")
        page.wait_for_load_state("networkidle")
        page.locator(".compare input[type=range]").fill("70")
        page.screenshot(path=DOCS / "web-job.png", full_page=True)
        page.goto(f"{url}/workers")
        page.screenshot(path=DOCS / "web-workers.png")
        browser.close()
    print(f"wrote {DOCS / 'web-jobs.png'}, {DOCS / 'web-job.png'}, {DOCS / 'web-workers.png'}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
