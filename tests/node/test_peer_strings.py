"""Peer strings are data (issue 9), end to end: a real ``gvr node`` process, real senders, its log file.

A PatientName sent with VR UI makes pydicom warn quoting the name; an
AffectedSOPInstanceUID holding CR LF made pynetdicom log a forged line; ESC
sequences in BodyPartExamined reached ``gvr audit``'s terminal. None may.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import select

from node.audit.models import Instance, InstanceStatus, Study, StudyState
from node.errors import StoreStatus
from tests.factories import DX_FOR_PRESENTATION, make_image, write
from tests.node.raw_dimse import context_ids, encode_body, send_raw_store
from tests.node.test_node_process import NodeProcess
from tests.peers import require_tool

NAME = "ZQXWYVERN^OTTOLINE"
FORGED = "2030-01-01 00:00:00,000 CRITICAL gvr.node: FORGED LINE"
ESCAPES = "\x1b[2J\x1b]0;owned\x07"


def _hostile_file(study_uid: str, folder: Path) -> Path:
    """A DX image whose PatientName is encoded with VR UI and whose BodyPartExamined holds ESC sequences."""
    raw = bytearray(write(make_image(study_uid, patient_name=NAME), folder).read_bytes())
    name_at = raw.index(b"\x10\x00\x10\x00PN")
    raw[name_at + 4 : name_at + 6] = b"UI"
    part = b"CHEST" + ESCAPES.encode() + b"X"  # even length
    old = b"\x18\x00\x15\x00CS\x06\x00CHEST "
    raw[raw.index(old) : raw.index(old) + len(old)] = b"\x18\x00\x15\x00CS" + len(part).to_bytes(2, "little") + part
    path = folder / "hostile.dcm"
    path.write_bytes(bytes(raw))
    return path


def _wait_study(node: NodeProcess, study_uid: str, timeout: float = 30) -> Study:
    audit = node.audit()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with audit.session() as session:
                study = session.scalar(select(Study).where(Study.study_uid == study_uid))
                if study is not None and study.state != StudyState.RECEIVING:
                    return study
            time.sleep(0.2)
    finally:
        audit.dispose()
    raise AssertionError(f"study {study_uid} never assembled")


def test_node_log_and_audit_carry_no_peer_value_raw(tmp_path: Path) -> None:
    """storescu sends the name-as-UI, ESC body part instance; pynetdicom a C-STORE whose instance UID holds
    CR LF and a forged log line. The node log has no name, no ESC and no forged line; ``gvr audit`` (table
    and JSON) prints no control character, and its JSON parses."""
    storescu = require_tool("storescu", "dcmtk")
    node = NodeProcess(tmp_path).start()
    study_uid = generate_uid()
    try:
        hostile = _hostile_file(study_uid, tmp_path / "in")
        sent = subprocess.run(
            [storescu, "-aet", "STORESCU", "-aec", "GVRNODE", "127.0.0.1", str(node.port), str(hostile)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr

        ae = AE(ae_title="GVRSCU")
        ae.add_requested_context(DX_FOR_PRESENTATION, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="GVRNODE")
        assert assoc.is_established
        ds = make_image(study_uid, seed=2, patient_name=NAME)
        forged_uid = f"{ds.SOPInstanceUID}\r\n{FORGED}"
        cx = context_ids(assoc)[DX_FOR_PRESENTATION]
        answer = send_raw_store(assoc, encode_body(ds), DX_FOR_PRESENTATION, forged_uid, cx, wait=5)
        assert answer.status == StoreStatus.CANNOT_UNDERSTAND and answer.seconds < 2
        assoc.release()

        study = _wait_study(node, study_uid)
        assert study.state == StudyState.NO_ELIGIBLE  # the body part is not CHEST
        audit = node.audit()
        with audit.session() as session:
            statuses = sorted(row.status for row in session.scalars(select(Instance)))
        audit.dispose()
        assert statuses == sorted([InstanceStatus.ACCEPTED, InstanceStatus.REJECTED])

        env = dict(node.env, PYTHONUNBUFFERED="1")
        for argv in ([], ["--json"]):
            shown = subprocess.run([sys.executable, "-m", "node.cli.main", "audit", *argv], env=env,
                                   capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
            out = shown.stdout
            assert "\x1b" not in out and "\x07" not in out and "\r" not in out, f"gvr audit {argv}"
            assert not any(line.startswith(FORGED[:10]) for line in out.splitlines())
            assert NAME not in out
        json.loads(out)
    finally:
        node.stop()
    log = node.log.read_text(errors="replace")
    assert "ZQXWYVERN" not in log and "OTTOLINE" not in log, "the patient name reached the node log"
    assert "\x1b" not in log and "\x07" not in log
    lines = log.splitlines()
    assert not any(line.startswith(FORGED[:10]) for line in lines), "a forged log line"
    assert any("\\r\\n" + FORGED[:10] in line for line in lines), "the refusal is logged, escaped"
    assert os.path.getsize(node.log) > 0
