"""The peer ``benchmarks.e2e`` measures beside the node: an Orthanc routing node.

What a hospital builds without an AI node: a second, private Orthanc receives the
studies and a Lua ``OnStableStudy`` forwards each one to the PACS
(``SendToModality``, instance by instance). It does no inference, so its turnaround (last C-STORE response
to the forwarded image found in the PACS, polled as the node's SR is) is the floor of
a routing pipeline: study completion by quiet time, a job queue, one C-STORE.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread

from node.config import Peer
from node.demo.run import DemoStudy, send_study, wait_until_arrived
from tests.peers_orthanc import Orthanc

# The least Orthanc takes: 0 falls back to its default of 60 s. A study is stable once
# its age, counted in whole seconds of a seconds clock, exceeds StableAge (its monitor
# looks every 0.1 s): 1.0-2.1 s after its last instance, against the node's 1 s after
# the association's release.
STABLE_AGE_S = 1
PACS_NAME = "pacs"
ROUTE_LUA = f"""function OnStableStudy(studyId, tags, metadata)
  -- SendToModality takes an instance: given a study's id it fails ("Unable to read attachment")
  for _, instance in pairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/instances'))) do
    SendToModality(instance['ID'], '{PACS_NAME}')
  end
end
"""


class Rest(Protocol):
    """What the poll needs of the PACS: the demo's ``OrthancPacs`` or the tests' ``Orthanc``."""

    def request(self, method: str, path: str, body: Any = None) -> Any: ...


class RouterOrthanc(Orthanc):
    """A private Orthanc forwarding each stable study to ``pacs``; no plugins, the shortest StableAge."""

    def __init__(self, root: Path, pacs: Peer, aet: str = "ROUTER") -> None:
        super().__init__(root, aet=aet)
        self.pacs = pacs
        self.script = root / "route.lua"

    def config(self) -> dict[str, Any]:
        modality = [self.pacs.ae_title, self.pacs.host, self.pacs.port]
        return {
            **super().config(), "Plugins": [], "StableAge": STABLE_AGE_S, "LuaScripts": [str(self.script)],
            "DicomModalities": {PACS_NAME: modality},
        }  # fmt: skip

    def start(self, timeout: float = 30.0) -> RouterOrthanc:
        self.root.mkdir(parents=True, exist_ok=True)
        self.script.write_text(ROUTE_LUA)
        super().start(timeout)
        return self

    @property
    def peer(self) -> Peer:
        return Peer(ae_title=self.aet, host="127.0.0.1", port=self.dicom_port)


def has_instance(pacs: Rest, study_uid: str, sop_uid: str) -> bool:
    """Is this instance in the PACS yet? The node's SR poll (``/tools/find``), by SOP Instance UID.

    Not by Modality: the node's Secondary Captures sit in the same study, and may copy the source's.
    """
    query = {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "SOPInstanceUID": sop_uid}}
    return bool(pacs.request("POST", "/tools/find", query))


def wait_for_forwarded(pacs: Rest, studies: list[DemoStudy], timeout: float) -> None:
    """Poll the PACS every 0.1 s (as ``wait_for_reports`` does) until each sent study's last image arrived."""
    last_image = {
        s.study_uid: str(dcmread(s.files[-1], stop_before_pixels=True).SOPInstanceUID) for s in studies
    }
    wait_until_arrived(studies, lambda study: has_instance(pacs, study.study_uid, last_image[study.study_uid]), timeout)


def route_singles(router: RouterOrthanc, pacs: Rest, studies: list[DemoStudy], timeout: float) -> None:
    """One study at a time through an idle router: send, wait until it is in the PACS, next."""
    for study in studies:
        send_study(study, router.peer)
        wait_for_forwarded(pacs, [study], timeout)


def route_batch(router: RouterOrthanc, pacs: Rest, studies: list[DemoStudy], timeout: float) -> float:
    """Send every study back to back, wait for all; the wall time from the first send."""
    started = time.monotonic()
    for study in studies:
        send_study(study, router.peer)
    wait_for_forwarded(pacs, studies, timeout)
    return time.monotonic() - started
