"""The review page's FastAPI application: login, jobs, a job's story and pictures, workers.

Every page needs a logged-in user (a signed session cookie) except ``/healthz``
(the process answers) and ``/readyz`` (the audit DB and the spool answer). Forms
that change something carry a per-session CSRF token. Each response says its
server time in a ``Server-Timing`` header, which the benchmark and tests read.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from celery import Celery
from fastapi import FastAPI, Form, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import text
from starlette.middleware.sessions import SessionMiddleware

from node.artefacts import read_job_result
from node.audit.db import AuditDB
from node.audit.models import Job, JobState
from node.config import Settings
from node.web import auth, images, queries
from node.web.actions import RERUNNABLE, RESENDABLE, ActionRefused, rerun_job, resend_job

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
SESSION_HOURS = 8


@dataclass
class WebContext:
    """What the pages read: settings, the audit DB, the spool's results, the users file, a Celery app."""

    settings: Settings
    audit: AuditDB
    users_file: Path
    secret: str
    ping_timeout: float = 0.5
    study_keys: queries.StudyKeys = field(default_factory=queries.StudyKeys)
    _celery: Celery | None = field(default=None, repr=False)

    @property
    def results_root(self) -> Path:
        return self.settings.spool_dir / "results"

    def celery(self) -> Celery:
        if self._celery is None:
            from node.celery_app import make_celery

            self._celery = make_celery(self.settings)
        return self._celery


def users_file(settings: Settings) -> Path:
    return settings.web_users_file or settings.resolved_data_dir / "web-users"


def context_from(settings: Settings) -> WebContext:
    secret = auth.session_secret(settings.resolved_data_dir / "web-secret")
    return WebContext(settings, AuditDB(settings.audit_url), users_file(settings), secret)


class LoginRequired(Exception):
    """Raised by ``user_of``; answered with a redirect to the login page."""


def user_of(request: Request, ctx: WebContext) -> str:
    """The logged-in user, still in the users file (removing a user ends their sessions)."""
    user = request.session.get("user")
    if not isinstance(user, str) or user not in _users(ctx):
        request.session.clear()
        raise LoginRequired
    return user


def _users(ctx: WebContext) -> dict[str, str]:
    """The users file as it is now (re-read, so --add-user needs no restart); a broken file lets no one in."""
    try:
        return auth.load_users(ctx.users_file)
    except ValueError as error:
        log.error("review page: nobody can log in: %s", error)
        return {}


def _safe_next(target: str) -> str:
    """Only paths on this site: never ``//host`` or ``http://...`` (an open redirect)."""
    return target if target.startswith("/") and not target.startswith("//") else "/jobs"


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def create_app(ctx: WebContext) -> FastAPI:
    app = FastAPI(title="gvr-node review", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(SessionMiddleware, secret_key=ctx.secret, session_cookie="gvr_session",
                       max_age=SESSION_HOURS * 3600, same_site="strict")  # fmt: skip
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["when"] = _when

    @app.middleware("http")
    async def server_timing(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
        response.headers["X-Frame-Options"] = "DENY"
        return response

    @app.exception_handler(LoginRequired)
    async def to_login(request: Request, _error: LoginRequired) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target)}", status_code=303)

    def page(request: Request, name: str, user: str | None, status: int = 200, **values: Any) -> Response:
        flash = request.session.pop("flash", None)
        return templates.TemplateResponse(
            request, name, {"user": user, "flash": flash, "csrf": request.session.get("csrf", ""), **values},
            status_code=status,
        )

    def check_csrf(request: Request, token: str) -> None:
        if not secrets.compare_digest(token, str(request.session.get("csrf", ""))):
            raise LoginRequired

    # -- without login ------------------------------------------------------------------

    @app.get("/healthz")
    def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok\n")

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        problems = []
        try:
            with ctx.audit.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except Exception as error:  # noqa: BLE001 - any driver error means "not ready"; say which
            problems.append(f"audit DB: {type(error).__name__}")
        if not ctx.results_root.is_dir():
            problems.append(f"spool results folder {ctx.results_root} is missing")
        return JSONResponse({"ready": not problems, "problems": problems}, status_code=503 if problems else 200)

    @app.get("/login")
    def login_form(request: Request, next: str = "/jobs") -> Response:
        return page(request, "login.html", None, next=_safe_next(next), error=None)

    @app.post("/login")
    def login(request: Request, username: str = Form(...), password: str = Form(...),
              next: str = Form("/jobs")) -> Response:  # fmt: skip
        if not auth.check_login(_users(ctx), username, password):
            return page(request, "login.html", None, 401, next=_safe_next(next), error="Wrong user name or password.")
        request.session.clear()
        request.session.update(user=username, csrf=secrets.token_urlsafe(24))
        return RedirectResponse(_safe_next(next), status_code=303)

    @app.post("/logout")
    def logout(request: Request) -> Response:
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # -- pages --------------------------------------------------------------------------

    @app.get("/")
    def home() -> Response:
        return RedirectResponse("/jobs", status_code=303)

    @app.get("/jobs")
    def jobs(request: Request) -> Response:
        user = user_of(request, ctx)
        filters = queries.JobFilters.parse(request.query_params)
        with ctx.audit.session() as session:
            result = queries.list_jobs(session, filters, ctx.study_keys)
        return page(request, "jobs.html", user, filters=filters, result=result, states=JobState,
                    findings=queries.FINDINGS, oods=queries.OOD_CHOICES)  # fmt: skip

    @app.get("/jobs/{job_id}")
    def job(request: Request, job_id: str) -> Response:
        user = user_of(request, ctx)
        with ctx.audit.session() as session:
            story = queries.job_story(session, job_id)
        if story is None:
            return page(request, "missing.html", user, 404, what=f"job {job_id}")
        pictures = _pictures(ctx, job_id)
        return page(request, "job.html", user, story=story, pictures=pictures,
                    can_resend=story.job.state in RESENDABLE, can_rerun=story.job.state in RERUNNABLE,
                    report_ood=ctx.settings.report_ood_findings)  # fmt: skip

    @app.get("/jobs/{job_id}/images/{key}/{kind}.png")
    def picture(request: Request, job_id: str, key: str, kind: str) -> Response:
        user_of(request, ctx)
        with ctx.audit.session() as session:
            if session.get(Job, job_id) is None:  # only a job the audit knows names a spool folder
                return PlainTextResponse("no such job\n", status_code=404)
        try:
            png = images.render_png(ctx.results_root, job_id, key, kind)
        except (FileNotFoundError, LookupError) as error:
            return PlainTextResponse(f"{error}\n", status_code=404)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})

    @app.post("/jobs/{job_id}/{action}")
    def act(request: Request, job_id: str, action: str, csrf: str = Form("")) -> Response:
        user = user_of(request, ctx)
        check_csrf(request, csrf)
        do = {"resend": resend_job, "rerun": rerun_job}.get(action)
        if do is None:
            return PlainTextResponse("unknown action\n", status_code=404)
        try:
            request.session["flash"] = do(ctx.settings, ctx.audit, ctx.celery(), job_id, user)
        except ActionRefused as refused:
            request.session["flash"] = f"not done: {refused}"
        except Exception as error:  # noqa: BLE001 - broker errors come in many types; the page says which
            request.session["flash"] = f"not done: the broker did not take the task ({type(error).__name__})"
        return RedirectResponse(f"/jobs/{quote(job_id)}", status_code=303)

    @app.get("/workers")
    def workers(request: Request) -> Response:
        user = user_of(request, ctx)
        from node.broker_stats import QUEUES, live_workers, queue_depths

        depths = queue_depths(ctx.settings.celery_broker_url)
        alive = live_workers(ctx.settings, ctx.ping_timeout)
        with ctx.audit.session() as session:
            failures = queries.recent_failures(session)
        return page(request, "workers.html", user, depths=depths, alive=alive, failures=failures,
                    queue_names=QUEUES)

    return app


@dataclass(frozen=True)
class Picture:
    """One image of a job for the page: its key, and the reason it has no colour (or None)."""

    key: str
    no_rationale: str | None


def _pictures(ctx: WebContext, job_id: str) -> list[Picture] | str:
    """The job's images as the spool holds them, or why there is nothing to show."""
    from node.results.overlay import Caption

    try:
        result = read_job_result(ctx.results_root, job_id)
    except FileNotFoundError:
        return "no inference result in the spool yet"
    except (ValueError, KeyError, TypeError) as error:
        return f"the result in the spool cannot be read ({type(error).__name__})"
    return [Picture(image.key, Caption.for_image(result.model, image).no_rationale_reason) for image in result.images]
