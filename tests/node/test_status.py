"""``gvr status`` and ``gvr monitor`` against real brokers (SQLite, Redis), a real worker and Flower."""

from __future__ import annotations

import base64
import importlib.util
import json
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from node.audit.db import AuditDB
from node.audit.migrate import upgrade
from node.audit.models import Job, JobState, Study, StudyState, utcnow
from node.celery_app import TASK_ANALYZE, make_celery
from node.cli import monitor, status
from node.config import Peer, load_settings
from node.heartbeat import heartbeat_path, read_heartbeat
from node.scu import FileToSend, send_files
from tests.factories import write_study
from tests.peers import LOOPBACK, direct_opener, free_port, start_process, stop_process, wait_for_http

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_status(capsys: pytest.CaptureFixture[str], *argv: str, expect: int = 0) -> dict[str, Any]:
    code = status.main(["--json", "--ping-timeout", "0.5", *argv])
    report = dict(json.loads(capsys.readouterr().out))
    assert code == expect, report["health"]
    return report


@pytest.fixture
def gvr_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Set GVR_* for an in-process command (data in tmp_path/data); keyword arguments add more."""
    import os

    for name in list(os.environ):
        if name.startswith("GVR_"):
            monkeypatch.delenv(name)

    def apply(**values: str) -> None:
        monkeypatch.setenv("GVR_DATA_DIR", str(tmp_path / "data"))
        for key, value in values.items():
            monkeypatch.setenv(f"GVR_{key.upper()}", value)

    return apply


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_status_sqlite_broker_counts_queued_job(
    running_node: Any, gvr_env: Callable[..., None], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Embedded default: a completed study shows as 1 message on gpu, 1 QUEUED job, the oldest open one."""
    service = running_node()
    gvr_env()
    _wait(heartbeat_path(service.settings.resolved_data_dir).is_file, 10, "the node's first heartbeat")
    _uid, paths = write_study(tmp_path / "s", 2)
    peer = Peer(ae_title="GVRNODE", host=LOOPBACK, port=service.port)
    assert all(r.ok for r in send_files([FileToSend.read(p) for p in paths], peer, "GVRSCU"))
    _wait(lambda: run_status(capsys)["queues"]["waiting"].get("gpu") == 1, 20, "the job on the SQLite broker")

    report = run_status(capsys)
    assert report["queues"]["error"] is None and report["queues"]["waiting"] == {"gpu": 1, "dicom": 0}
    assert "broadcast" in report["workers"]["error"] and report["workers"]["checked"] is False
    assert report["health"] == {"ok": True, "problems": [], "unchecked": [
        f"workers of queue {q}: {report['workers']['error']}" for q in ("gpu", "dicom")]}  # fmt: skip
    assert report["node"]["threads"] == {"storage SCP": True, "assembler": True, **(
        {"reconciler": True} if hasattr(service, "reconciler") else {})}  # fmt: skip
    assert report["jobs"]["by_state"] == {"QUEUED": 1} and report["jobs"]["open_by_state"] == {"QUEUED": 1}
    assert report["jobs"]["oldest_unfinished"]["state"] == "QUEUED"
    assert status.main([]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Health: OK") and "queue gpu" in text and "Oldest unfinished job:" in text
    assert "not checked: workers of queue gpu" in text


def test_sqlite_broker_before_kombu_declares_its_tables_is_empty_not_broken(tmp_path: Path) -> None:
    """A fresh node opens the broker file before the first message makes kombu's tables: 0 waiting, no error."""
    import sqlite3

    from node.broker_stats import QUEUES, queue_depths

    path = tmp_path / "broker.sqlite"
    sqlite3.connect(path).close()  # the file exists, no table yet
    depths = queue_depths(f"sqla+sqlite:///{path}")
    assert depths.error is None and depths.waiting == {name: 0 for name in QUEUES}


def test_status_nothing_reachable_reports_each_part(
    gvr_env: Callable[..., None], capsys: pytest.CaptureFixture[str]
) -> None:
    """Nothing reachable: every part says why, exit status 1 naming broker, DB, node and workers, fast."""
    gvr_env(broker_url=f"redis://{LOOPBACK}:{free_port()}/0", database_url=f"postgresql+psycopg2://gvr@{LOOPBACK}:{free_port()}/none")
    started = time.monotonic()
    report = run_status(capsys, expect=1)
    assert time.monotonic() - started < 10
    assert "Connection" in report["queues"]["error"]
    assert report["workers"]["error"]
    assert report["jobs"]["error"].startswith("audit DB")
    problems = report["health"]["problems"]
    assert [p.split(":")[0] for p in problems] == ["broker", "audit DB", "node", "workers of queue gpu",
                                                  "workers of queue dicom"]  # fmt: skip
    assert "no heartbeat file" in problems[2]


def test_status_redacts_broker_password() -> None:
    """The printed broker URL never carries the password."""
    assert status.redacted("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert status.redacted("redis://user:s3cret@host:6379/0") == "redis://user:***@host:6379/0"
    assert status.redacted("redis://host:6379/0") == "redis://host:6379/0"


@pytest.fixture
def celery_worker(redis_url: str, tmp_path: Path) -> Iterator[str]:
    """A real Celery worker on the test's Redis DB (solo pool) consuming a private queue; yields its name."""
    name = f"gvrtest-{uuid.uuid4().hex[:8]}@{LOOPBACK}"
    log = tmp_path / "worker.log"
    command = [sys.executable, "-m", "celery", f"--broker={redis_url}", "worker", "-P", "solo", "-Q",
               "gvr-status-test", "-n", name, "--without-mingle", "--without-gossip", "-E"]  # fmt: skip
    process = start_process(command, log, cwd=REPO_ROOT)
    try:
        yield name
    finally:
        stop_process(process)


def test_status_redis_depths_workers_and_jobs(
    redis_url: str, celery_worker: str, gvr_env: Callable[..., None], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Redis: LLEN per queue, the live worker answers ping, jobs of the last hour by state."""
    gvr_env(broker_url=redis_url)
    settings = load_settings()
    upgrade(settings.audit_url)
    audit = AuditDB(settings.audit_url)
    now = utcnow()
    with audit.session() as session:
        study = Study(study_uid=generate_uid(), state=StudyState.ASSEMBLED)
        session.add(study)
        session.flush()
        session.add_all([
            Job(id="old-running", study_id=study.id, state=JobState.RUNNING, attempts=2,
                created_at=now - timedelta(minutes=5), updated_at=now),
            Job(id="sent", study_id=study.id, state=JobState.SENT, updated_at=now),
            Job(id="long-ago", study_id=study.id, state=JobState.SENT, updated_at=now - timedelta(hours=3)),
        ])  # fmt: skip
    audit.dispose()
    app = make_celery(settings)
    for job in ("a", "b", "c"):
        app.send_task(TASK_ANALYZE, args=[job])
    app.close()

    report = _wait(lambda: (r := run_status(capsys, "--check", "broker,db,gpu", expect=1))["workers"]["names"]
                   and r, 30, "the worker to answer")  # fmt: skip
    assert report["health"]["problems"] == ["workers of queue gpu: none alive"]  # it consumes another queue
    assert run_status(capsys, "--check", "broker,db")["workers"]["error"] == "not asked: --check names no queue"
    assert report["workers"]["names"] == [celery_worker]
    assert report["workers"]["by_queue"] == {"gpu": [], "dicom": [], "gvr-status-test": [celery_worker]}
    assert report["jobs"]["open_by_state"] == {"RUNNING": 1}
    everything = run_status(capsys, expect=1)  # nobody consumes gpu or dicom
    assert "workers of queue gpu: none alive" in everything["health"]["problems"]
    assert report["queues"]["waiting"] == {"gpu": 3, "dicom": 0}
    assert report["queues"]["unacked"] == 0
    assert report["jobs"]["by_state"] == {"RUNNING": 1, "SENT": 1}
    oldest = report["jobs"]["oldest_unfinished"]
    assert oldest["id"] == "old-running" and oldest["attempts"] == 2 and 290 < oldest["age_seconds"] < 400


def test_monitor_flower_lists_the_worker(
    redis_url: str, celery_worker: str, gvr_env: Callable[..., None], tmp_path: Path
) -> None:
    """``gvr monitor`` starts Flower on the broker; its API (basic auth) lists the running worker."""
    if importlib.util.find_spec("flower") is None:
        pytest.skip("flower not installed: pip install 'gvr-node[monitor]'")
    port = free_port()
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("GVR_")}
    env.update(GVR_BROKER_URL=redis_url, GVR_DATA_DIR=str(tmp_path / "data"))
    log = tmp_path / "flower.log"
    env.update(FLOWER_BASIC_AUTH="ops:pw")  # issue 11: never on the command line
    command = [sys.executable, "-m", "node.cli.main", "monitor", "--port", str(port)]
    process = start_process(command, log, env, cwd=REPO_ROOT)
    try:
        wait_for_http(f"http://{LOOPBACK}:{port}/healthcheck", 30, process, log)
        assert b"ops:pw" not in Path(f"/proc/{process.pid}/cmdline").read_bytes()
        assert "ops:pw" not in log.read_text()

        def workers() -> Any:
            request = urllib.request.Request(f"http://{LOOPBACK}:{port}/api/workers?refresh=1")
            request.add_header("Authorization", "Basic " + base64.b64encode(b"ops:pw").decode())
            with direct_opener().open(request, timeout=10) as response:
                return celery_worker in json.loads(response.read())

        assert _wait(workers, 30, "Flower to see the worker")
    finally:
        stop_process(process)


def test_monitor_print_command_hides_password(capsys: pytest.CaptureFixture[str], gvr_env: Any) -> None:
    """--print-command shows the celery flower line with the broker password masked."""
    gvr_env(broker_url="redis://:s3cret@127.0.0.1:6379/2")
    assert monitor.main(["--print-command", "--port", "5566"]) == 0
    line = capsys.readouterr().out
    assert "flower" in line and "--port=5566" in line and "s3cret" not in line and ":***@" in line


def test_monitor_refuses_password_in_argv(gvr_env: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--basic-auth on the command line is refused (exit 2); a file works and stays out of the printed command."""
    gvr_env(broker_url="redis://127.0.0.1:6379/2")
    assert monitor.main(["--basic-auth", "ops:pw", "--print-command"]) == 2
    secret = tmp_path / "flower-auth"
    secret.write_text("ops:pw\n")
    assert monitor.main(["--basic-auth-file", str(secret), "--print-command"]) == 0
    assert "pw" not in capsys.readouterr().out
    assert monitor.basic_auth(secret, {}) == "ops:pw"
    assert monitor.basic_auth(None, {"FLOWER_BASIC_AUTH": "a:b"}) == "a:b"
    with pytest.raises(ValueError, match="USER:PASSWORD"):
        monitor.basic_auth(None, {"FLOWER_BASIC_AUTH": "no-colon"})


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"at": 0.0, "threads": {"assembler": True}, "stopped": None}, "no heartbeat for 1000 s"),
        ({"at": 990.0, "threads": {"assembler": False, "reconciler": True}, "stopped": None},
         "service thread(s) not running: assembler"),
        ({"at": 995.0, "threads": {"assembler": True}, "stopped": "background thread(s) died: assembler"},
         "stopped 5 s ago (background thread(s) died: assembler)"),
        ({"at": 999.0, "threads": {"assembler": True}, "stopped": None}, None),
    ],
)  # fmt: skip
def test_heartbeat_judged_stale_dead_stopped_or_fine(record: dict[str, Any], problem: str | None,
                                                     tmp_path: Path) -> None:  # fmt: skip
    """A stale file, a dead thread or a stopped node is a problem that says which; a fresh one is none."""
    path = tmp_path / "node.json"
    path.write_text(json.dumps({"host": "h", "pid": 1, **record}))
    health = read_heartbeat(path, now=1000.0)
    assert (health.problem is None) == (problem is None)
    assert problem is None or problem in str(health.problem)
    assert "no heartbeat file" in str(read_heartbeat(tmp_path / "absent.json").problem)


def test_status_sees_gvr_node_threads_then_its_stop(tmp_path: Path) -> None:
    """A real `gvr node`: status --check node exits 0 while it runs and 1 (stopped) after SIGTERM."""
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("GVR_")}
    env.update(GVR_DATA_DIR=str(tmp_path / "data"), GVR_PORT=str(free_port()))
    check = [sys.executable, "-m", "node.cli.main", "status", "--check", "node", "--json"]

    def node_status() -> tuple[int, dict[str, Any]]:
        done = __import__("subprocess").run(check, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        return done.returncode, json.loads(done.stdout)

    process = start_process([sys.executable, "-m", "node.cli.main", "node"], tmp_path / "node.log", env,
                            cwd=REPO_ROOT)  # fmt: skip
    try:
        code, report = _wait(lambda: (r := node_status())[0] == 0 and r, 30, "the node's first heartbeat")
        assert report["node"]["threads"]["assembler"] is True and report["node"]["threads"]["storage SCP"] is True
    finally:
        stop_process(process)
    code, report = node_status()
    assert code == 1 and "stopped" in report["health"]["problems"][0]
