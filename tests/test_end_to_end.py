"""The whole product: Orthanc sends a study to the node, the SC and SR come back into it.

Real Orthanc, a real node, a real Celery worker (SQLite broker, the demo bundle),
real delivery; nothing faked.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom

from node.audit.models import JobState
from node.demo.pacs import OrthancPacs
from node.demo.run import demo_environment, jobs_by_study, make_studies, wait_for_reports
from tests.peers import require_tool


def test_end_to_end_orthanc_to_node_and_back(tmp_path: Path) -> None:
    """A positive phantom study: Orthanc -> node -> worker -> SCs + SR in the same Orthanc study."""
    require_tool("Orthanc", "orthanc")
    dsrdump = require_tool("dsrdump", "dcmtk")
    studies = make_studies(tmp_path / "studies", 1)
    study = studies[0]
    with demo_environment(tmp_path, ["gpu,dicom"]) as demo:
        assert isinstance(demo.pacs, OrthancPacs) and demo.workers
        for path in study.files:
            demo.pacs.upload(path)
        orthanc_study = demo.pacs.study_id(study.study_uid)
        demo.pacs.request("POST", "/modalities/gvr/store", {"Resources": [orthanc_study], "Synchronous": True})
        study.sent_at = time.monotonic()
        wait_for_reports(demo.pacs, studies, timeout=120)
        assert study.reported_at is not None, _logs(tmp_path)
        time.sleep(0.5)  # the delivery worker commits SENT right after its last C-STORE
        job = jobs_by_study(demo.service)[study.study_uid]
        instances = demo.pacs.request("GET", f"/studies/{orthanc_study}/instances")
        tags = [demo.pacs.request("GET", f"/instances/{item['ID']}/simplified-tags") for item in instances]
    assert job.state == JobState.SENT, job.error
    modalities = sorted(tag.get("Modality", "") for tag in tags)
    # the source, three Secondary Captures (overlay, side by side, cine) and the SR: one study
    assert len(instances) == 5 and modalities.count("SR") == 1, modalities
    outbox = tmp_path / "node" / "spool" / "outbox" / job.id
    report = next(p for p in outbox.glob("*.dcm") if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SR")
    dump = subprocess.run([dsrdump, str(report)], capture_output=True, text=True, check=True).stdout
    assert '"Heart failure")=(52101004,SCT,"Present")' in dump or '"Heart failure")=(272519000,SCT,"Absent")' in dump


def _logs(folder: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in folder.glob("worker-*.log"))
