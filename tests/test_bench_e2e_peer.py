"""``make bench-e2e``'s peer: an Orthanc routing node forwarding each stable study to the PACS."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import dcmread

from benchmarks.e2e_peer import STABLE_AGE_S, RouterOrthanc, wait_for_forwarded
from node.config import Peer
from node.demo.run import make_studies
from tests.peers_orthanc import Orthanc


def test_router_forwards_a_stable_study_to_the_pacs(
    tmp_path: Path, orthanc: Orthanc, storescu: Callable[..., Any]
) -> None:
    """A study sent by storescu reaches the PACS through the router's Lua, after StableAge and within seconds."""
    pacs = Peer(ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port)
    [study] = make_studies(tmp_path / "studies", 1)
    router = RouterOrthanc(tmp_path / "router", pacs).start()
    try:
        sent = storescu(router.dicom_port, study.files, called_aet=router.aet)
        study.sent_at = time.monotonic()
        assert sent.returncode == 0, sent.stderr
        wait_for_forwarded(orthanc, [study], timeout=15)
    finally:
        router.stop()
    assert study.turnaround is not None, "the study never reached the PACS"
    assert STABLE_AGE_S < study.turnaround < 10  # not before the study is stable; not Orthanc's default 60 s
    [instance] = orthanc.find_instances()
    assert orthanc.instance_tags(instance)["SOPInstanceUID"] == dcmread(study.files[0]).SOPInstanceUID
