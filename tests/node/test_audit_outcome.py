"""``gvr audit`` shows each job's outcome (finding, probability, OOD) and whole reasons, in tables and JSON."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from node.audit.db import AuditDB
from node.audit.migrate import upgrade
from node.audit.models import Job, JobState, Study, StudyState
from node.audit.outcome import NOT_ANALYSED, job_outcome
from node.audit.report import render_table
from node.cli import audit as audit_cmd

REASON = ("delivery to PACS@pacs.example.org:104 failed: A-ASSOCIATE-RJ, rejected permanent, source service user, "
          "reason: calling ae title not recognised; declare GVRNODE on the PACS")  # fmt: skip


def _image(probability: float, positive: bool, ood: bool = False) -> dict[str, Any]:
    return {"key": "x", "probability": probability, "positive": positive, "ood_flag": ood}


@pytest.mark.parametrize(
    ("images", "expected"),
    [
        ([_image(0.91, True), _image(0.2, False)], {"finding": "HF+", "probability": 0.91, "ood": False}),
        ([_image(0.12, False)], {"finding": "HF-", "probability": 0.12, "ood": False}),
        ([_image(0.97, True, ood=True), _image(0.3, False)], {"finding": "HF-", "probability": 0.97, "ood": True}),
        ([_image(0.7, True, ood=True)], {"finding": NOT_ANALYSED, "probability": 0.7, "ood": True}),
        ([], {"finding": None, "probability": None, "ood": None}),
    ],
)
def test_job_outcome_from_result_images(images: list[dict[str, Any]], expected: dict[str, Any]) -> None:
    """Highest probability; an OOD image gives no finding; no images, no outcome."""
    assert job_outcome({"images": images}) == expected
    assert job_outcome(None) == {"finding": None, "probability": None, "ood": None}


def test_render_table_wraps_free_text_keeps_identifiers_whole() -> None:
    """Long text wraps onto continuation lines (nothing cut); a UID without spaces stays on one line."""
    table = render_table(("a", "b"), [{"a": "word " * 8, "b": None}, {"a": "1.2.840.10008.5.1.4.1.1.7", "b": 1}],
                         max_width=12)  # fmt: skip
    assert table.splitlines()[2:] == ["word word                  -", "word word", "word word", "word word",
                                      "1.2.840.10008.5.1.4.1.1.7  1"]  # fmt: skip
    assert "..." not in table


@pytest.fixture
def seeded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An audit DB with one INFERRED job (positive) and one FAILED job with a long reason."""
    for name in [n for n in os.environ if n.startswith("GVR_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("GVR_DATA_DIR", str(tmp_path))
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    upgrade(url)
    audit = AuditDB(url)
    with audit.session() as session:
        study = Study(study_uid=generate_uid(), state=StudyState.ASSEMBLED)
        session.add(study)
        session.flush()
        session.add_all([
            Job(id="inferred-job", study_id=study.id, state=JobState.INFERRED, worker="gpu0@host:4211",
                result={"images": [_image(0.873, True), _image(0.41, False)]}),
            Job(id=str(uuid.uuid4()), study_id=study.id, state=JobState.FAILED, error=REASON),
        ])  # fmt: skip
    audit.dispose()
    return url


def test_audit_json_and_table_show_outcome_and_whole_reason(seeded: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--json carries finding, probability, OOD; the table shows them and the whole reason, wrapped."""
    assert audit_cmd.main(["--json"]) == 0
    jobs = {job["state"]: job for job in json.loads(capsys.readouterr().out)["jobs"]}
    assert (jobs["INFERRED"]["finding"], jobs["INFERRED"]["probability"], jobs["INFERRED"]["ood"]) == ("HF+", 0.873,
                                                                                                      False)  # fmt: skip
    assert jobs["FAILED"]["error"] == REASON and jobs["FAILED"]["finding"] is None
    assert audit_cmd.main([]) == 0
    table = capsys.readouterr().out
    jobs_table = table[table.index("Jobs ("):table.index("Events (")]
    assert "finding" in jobs_table and "HF+" in jobs_table and "0.873" in jobs_table
    assert " ".join(jobs_table.split()).count("declare GVRNODE on the PACS") == 1  # wrapped, not cut
    assert "..." not in jobs_table


def test_worker_actor_named_like_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a `gvr worker` process the audit's actor starts with the Celery node name Flower and status show."""
    from node.audit.db import WORKER_NODENAME_VARIABLE, actor_name

    monkeypatch.setenv(WORKER_NODENAME_VARIABLE, "gpu0@ward-7")
    assert actor_name("worker") == f"gpu0@ward-7:{os.getpid()}"
    assert actor_name("node").endswith(f":{os.getpid()}:node")
