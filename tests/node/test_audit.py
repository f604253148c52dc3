"""The audit database: migrations, constraints, the append-only trail, ``gvr db`` and ``gvr audit``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect, select
from sqlalchemy.exc import IntegrityError

from node.audit.db import AuditDB, add_event
from node.audit.migrate import current_revision, upgrade
from node.audit.models import (
    Association,
    AssociationOutcome,
    Base,
    Event,
    Instance,
    InstanceStatus,
    Job,
    JobState,
    Study,
    StudyState,
)
from node.audit.report import AuditQuery, render_table
from node.cli import audit as audit_cmd
from node.cli import db as db_cmd
from node.cli.db import head_revision
from node.study_key import study_key

STUDY_UID = "1.2.826.0.1.3680043.8.498.1001"
OTHER_STUDY_UID = "1.2.826.0.1.3680043.8.498.2002"
JOB_ID = "6f1c2a5e-0000-4000-8000-000000000001"
PATIENT_NAME = "DOE^JANE"
T0 = datetime(2026, 11, 26, 1, 0, 0, tzinfo=UTC)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No GVR_* from the caller's shell; GVR_DATA_DIR in tmp_path. Returns the data folder."""
    for name in list(os.environ):
        if name.startswith("GVR_"):
            monkeypatch.delenv(name)
    data_dir = tmp_path / "data"
    monkeypatch.setenv("GVR_DATA_DIR", str(data_dir))
    return data_dir


def _instance(status: InstanceStatus, sop: str, study_uid: str = STUDY_UID, **extra: object) -> Instance:
    dimse = {InstanceStatus.ACCEPTED: 0, InstanceStatus.DUPLICATE: 0, InstanceStatus.REJECTED: 0xA900}[status]
    return Instance(status=status, dimse_status=dimse, sop_instance_uid=sop, study_uid=study_uid, **extra)


def _seed(url: str) -> None:
    """One association that sent a study (2 accepted, 1 duplicate, 1 rejected), a failed job, events."""
    audit = AuditDB(url)
    try:
        with audit.session() as session:
            association = Association(
                calling_ae="STORESCU", called_ae="GVRNODE", peer_ip="127.0.0.1", peer_port=50123,
                started_at=T0, ended_at=T0 + timedelta(seconds=2), outcome=AssociationOutcome.RELEASED,
            )  # fmt: skip
            study = Study(
                study_uid=STUDY_UID,
                state=StudyState.ASSEMBLED,
                first_received_at=T0,
                last_received_at=T0 + timedelta(seconds=1),
                assembled_at=T0 + timedelta(seconds=7),
            )
            other = Study(study_uid=OTHER_STUDY_UID, state=StudyState.NO_ELIGIBLE, first_received_at=T0,
                          last_received_at=T0, reason="no frontal chest radiograph")  # fmt: skip
            session.add_all([association, study, other])
            session.flush()
            session.add_all([
                _instance(InstanceStatus.ACCEPTED, "1.2.3.1", association=association),
                _instance(InstanceStatus.ACCEPTED, "1.2.3.2", association=association),
                _instance(InstanceStatus.DUPLICATE, "1.2.3.2", association=association),
                _instance(InstanceStatus.REJECTED, "1.2.3.3", association=association, reason="truncated"),
                _instance(InstanceStatus.ACCEPTED, "1.2.9.1", study_uid=OTHER_STUDY_UID),
            ])  # fmt: skip
            session.add(Job(id=JOB_ID, study_id=study.id, state=JobState.FAILED, attempts=3,
                            worker="gpu-host-1:4242", created_at=T0 + timedelta(seconds=7),
                            error="CUDA out of memory after 3 attempts"))  # fmt: skip
            add_event(session, "study.assembled", ("study", STUDY_UID), "test:1:scp", "study assembled")
            details = {"attempt": 3, "PatientName": PATIENT_NAME, "nested": {"patient_id": "X1"}}
            add_event(
                session, "job.failed", ("job", JOB_ID), "test:1:worker", "gave up after 3 attempts", details
            )
            add_event(session, "study.no_eligible", ("study", OTHER_STUDY_UID), "test:1:scp", "nothing to do")
    finally:
        audit.dispose()


def test_migrations_create_every_table_at_head(audit_db_url: str) -> None:
    """``upgrade`` on an empty SQLite or PostgreSQL database creates every model table; revision is head."""
    assert current_revision(audit_db_url) is None
    upgrade(audit_db_url)
    audit = AuditDB(audit_db_url)
    try:
        tables = set(inspect(audit.engine).get_table_names())
    finally:
        audit.dispose()
    assert set(Base.metadata.tables) | {"alembic_version"} == tables
    assert current_revision(audit_db_url) == head_revision(audit_db_url)


def test_instances_unique_accepted_sop_allows_duplicate_rows(audit_db_url: str) -> None:
    """A second *accepted* row for one SOP instance is refused; a *duplicate* row for it is kept."""
    upgrade(audit_db_url)
    audit = AuditDB(audit_db_url)
    try:
        with audit.session() as session:
            session.add(_instance(InstanceStatus.ACCEPTED, "1.2.3.4"))
        with audit.session() as session:
            session.add(_instance(InstanceStatus.DUPLICATE, "1.2.3.4"))
            session.add(_instance(InstanceStatus.REJECTED, "1.2.3.4"))
        with pytest.raises(IntegrityError), audit.session() as session:
            session.add(_instance(InstanceStatus.ACCEPTED, "1.2.3.4"))
        with audit.session() as session:
            statuses = sorted(
                session.scalars(select(Instance.status).where(Instance.sop_instance_uid == "1.2.3.4"))
            )
        assert statuses == ["accepted", "duplicate", "rejected"]
    finally:
        audit.dispose()


def test_events_append_only_update_and_delete_raise(audit_db_url: str) -> None:
    """An Event row can be added but neither changed nor deleted through the ORM."""
    upgrade(audit_db_url)
    audit = AuditDB(audit_db_url)
    try:
        with audit.session() as session:
            add_event(session, "job.queued", ("job", JOB_ID), "test", "queued")
        with pytest.raises(RuntimeError, match="append-only"), audit.session() as session:
            session.scalars(select(Event)).one().message = "rewritten"
        with pytest.raises(RuntimeError, match="append-only"), audit.session() as session:
            session.delete(session.scalars(select(Event)).one())
        with audit.session() as session:
            assert [e.message for e in session.scalars(select(Event))] == ["queued"]
    finally:
        audit.dispose()


def test_db_upgrade_idempotent_and_current_reports_head(
    audit_db_url: str, clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``gvr db upgrade`` twice succeeds and changes nothing the second time; ``current --check`` passes."""
    monkeypatch.setenv("GVR_DATABASE_URL", audit_db_url)
    assert db_cmd.main(["current", "--check"]) == 1
    assert "none" in capsys.readouterr().out
    assert db_cmd.main(["upgrade"]) == 0
    assert "upgraded from empty to" in capsys.readouterr().out
    assert db_cmd.main(["upgrade", "--revision", "head"]) == 0
    assert "already at" in capsys.readouterr().out
    assert db_cmd.main(["current", "--check"]) == 0
    assert capsys.readouterr().out.strip() == f"{head_revision(audit_db_url)} (head)"


def test_db_current_missing_sqlite_file_not_created(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Asking for the revision of a database that does not exist yet leaves no file behind."""
    assert db_cmd.main(["current"]) == 0
    assert "empty database" in capsys.readouterr().out
    assert not clean_env.exists()


def test_db_config_file_names_the_database(tmp_path: Path, clean_env: Path) -> None:
    """``--config FILE`` (TOML) picks the database on every sub-command."""
    target = tmp_path / "elsewhere" / "audit.sqlite3"
    config = tmp_path / "gvr.toml"
    config.write_text(f'database_url = "sqlite:///{target}"\n')
    assert db_cmd.main(["upgrade", "--config", str(config)]) == 0
    assert current_revision(f"sqlite:///{target}") is not None
    assert db_cmd.main(["current", "--check", "--config", str(config)]) == 0
    assert audit_cmd.main(["--config", str(config)]) == 0


def test_audit_json_lists_inserted_rows_without_patient_names(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``gvr audit --json``: four lists with the seeded rows, instance counts, ISO datetimes, no PHI."""
    url = f"sqlite:///{clean_env / 'audit.sqlite3'}"
    upgrade(url)
    _seed(url)
    assert audit_cmd.main(["--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out)
    assert set(report) == {"associations", "studies", "jobs", "events"}
    (association,) = report["associations"]
    assert association["outcome"] == "released" and association["instances"] == 4
    assert datetime.fromisoformat(association["started_at"]) == T0
    study = next(s for s in report["studies"] if s["study_uid"] == STUDY_UID)
    assert (study["accepted"], study["duplicate"], study["rejected"]) == (2, 1, 1)
    (job,) = report["jobs"]
    assert (job["id"], job["state"], job["attempts"], job["worker"]) == (
        JOB_ID,
        "FAILED",
        3,
        "gpu-host-1:4242",
    )
    assert "CUDA out of memory" in job["error"]
    assert [e["kind"] for e in report["events"]] == ["study.no_eligible", "job.failed", "study.assembled"]
    failed = report["events"][1]
    assert failed["details"] == {"attempt": 3, "nested": {}}
    assert PATIENT_NAME not in out and "X1" not in out


def test_audit_tables_align_and_show_inserted_rows(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default output: four titled tables, header underlined, seeded values in their columns."""
    url = f"sqlite:///{clean_env / 'audit.sqlite3'}"
    upgrade(url)
    _seed(url)
    assert audit_cmd.main([]) == 0
    out = capsys.readouterr().out
    for title in ("Associations (1,", "Studies (2,", "Jobs (1,", "Events (3,"):
        assert title in out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("id  study_key  study_uid"))
    row = next(line for line in lines if line.startswith("1 ") and STUDY_UID in line)
    assert row.index("assembled") == header.index("state")
    assert row.split()[1] == study_key(STUDY_UID)  # the demo's summary and the review page use the same key
    assert row.split()[-4:] == ["2", "1", "1", "-"]  # accepted duplicate rejected reason
    assert "2026-11-26 01:00:00" in out and "FAILED" in out and "gpu-host-1:4242" in out
    assert PATIENT_NAME not in out


def test_audit_study_and_job_filters_narrow_every_list(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--study`` and ``--job`` keep only that study's rows; an unknown job exits 1."""
    url = f"sqlite:///{clean_env / 'audit.sqlite3'}"
    upgrade(url)
    _seed(url)
    assert audit_cmd.main(["--json", "--study", OTHER_STUDY_UID]) == 0
    other = json.loads(capsys.readouterr().out)
    assert [s["study_uid"] for s in other["studies"]] == [OTHER_STUDY_UID]
    assert other["jobs"] == [] and other["associations"] == []
    assert [e["kind"] for e in other["events"]] == ["study.no_eligible"]
    assert audit_cmd.main(["--json", "--job", JOB_ID, "--limit", "1"]) == 0
    by_job = json.loads(capsys.readouterr().out)
    assert [s["study_uid"] for s in by_job["studies"]] == [STUDY_UID]
    assert [e["kind"] for e in by_job["events"]] == ["job.failed"]
    assert audit_cmd.main(["--job", "no-such-job"]) == 1


def test_audit_without_schema_asks_for_upgrade(clean_env: Path) -> None:
    """On a database never migrated, ``gvr audit`` exits 1 and creates nothing."""
    assert audit_cmd.main([]) == 1
    assert not clean_env.exists()


def test_audit_console_entry_point_runs(clean_env: Path) -> None:
    """The installed ``gvr`` script runs ``gvr db upgrade`` and ``gvr audit --json`` in a fresh process."""
    gvr = Path(sys.executable).parent / "gvr"
    if not gvr.is_file():
        pytest.skip(f"no gvr script next to {sys.executable}: pip install -e '.[test]'")
    env = {**os.environ, "GVR_DATA_DIR": str(clean_env)}
    subprocess.run([str(gvr), "db", "upgrade"], env=env, check=True, capture_output=True, timeout=60)
    _seed(f"sqlite:///{clean_env / 'audit.sqlite3'}")
    result = subprocess.run(
        [str(gvr), "audit", "--json"], check=False, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["jobs"][0]["id"] == JOB_ID


def test_audit_query_rejects_bad_values() -> None:
    """A limit below 1 or a blank UID is a caller mistake, named in the error."""
    with pytest.raises(ValueError, match="limit"):
        AuditQuery(limit=0)
    with pytest.raises(ValueError, match="study_uid"):
        AuditQuery(study_uid=" ")


def test_render_table_keeps_long_cells_and_marks_empty() -> None:
    """A long cell is never cut (issue 11: wrapped when it has spaces); None shows '-'; no rows shows '(none)'."""
    table = render_table(("a", "b"), [{"a": "x" * 30, "b": None}], max_width=10)
    assert table.splitlines()[2] == "x" * 30 + "  -"
    assert render_table(("a",), []) == "(none)"


def test_audit_escapes_control_characters_from_peers(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """issue 9: ESC, CR LF, DEL and bidi overrides a peer put in the audit DB (an AE title, a reason quoting a
    header value) reach neither the table nor ``--json`` raw; the JSON stays valid and keeps the values."""
    url = f"sqlite:///{clean_env / 'audit.sqlite3'}"
    upgrade(url)
    hostile = "CHEST\x1b[2J\x1b]0;owned\x07\r\nFORGED\x7f\u202e"
    audit = AuditDB(url)
    with audit.session() as session:
        session.add(Association(calling_ae="EVIL\x1b[31m", called_ae="GVRNODE", peer_ip="127.0.0.1", peer_port=1,
                                outcome=AssociationOutcome.REJECTED, reason=f"calling AE {hostile}"))  # fmt: skip
        session.add(Study(study_uid=STUDY_UID, state=StudyState.NO_ELIGIBLE, reason=f"body part {hostile}"))
        session.flush()
        add_event(session, "study.no_eligible", ("study", STUDY_UID), "node", f"skipped: {hostile}", {"part": hostile})
    audit.dispose()
    for argv in ([], ["--json"]):
        assert audit_cmd.main(argv) == 0
        out = capsys.readouterr().out
        raw = [c for c in out if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F or c == "\u202e"]
        assert raw == [], f"gvr audit {argv} printed control characters raw: {raw!r}"
        assert not any(line.startswith("FORGED") for line in out.splitlines())
    report = json.loads(out)
    assert report["events"][0]["details"] == {"part": hostile}  # escaped on the wire, the same value parsed
    assert report["studies"][0]["reason"] == f"body part {hostile}"
