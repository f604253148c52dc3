"""Last of the suite: no log line of any node or worker it ran holds a patient name or ID that was sent.

Every process the suite starts logs to a ``gvr-*.log`` file under pytest's base
temporary folder; the suite's data carry one distinctive patient name and ID
(``harness.PHI_NAME``, ``harness.PHI_ID``), searched here in each log, also by
name component and case-insensitively.
"""

from __future__ import annotations

import pytest

from tests.reliability.harness import FIGURES, PHI_ID, PHI_NAME


def test_zz_no_patient_name_or_id_in_any_log(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Grep every gvr-*.log of this run for the sent PatientName (and its parts) and PatientID."""
    logs = sorted(tmp_path_factory.getbasetemp().rglob("gvr-*.log"))
    if not logs:
        pytest.skip("no node or worker log in this run: run the whole tests/reliability suite")
    needles = {PHI_ID.lower(), PHI_NAME.lower(), *(part.lower() for part in PHI_NAME.split("^"))}
    leaks = []
    for log in logs:
        for number, line in enumerate(log.read_text(errors="replace").splitlines(), start=1):
            if any(needle in line.lower() for needle in needles):
                leaks.append(f"{log.name}:{number}: {line[:160]}")
    FIGURES.log_files_checked += len(logs)
    assert leaks == [], f"{len(leaks)} log line(s) carry patient data:\n" + "\n".join(leaks[:20])
