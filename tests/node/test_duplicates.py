"""One truth for duplicates (issue 9, part 4): a real node, real pynetdicom senders, spool compared with audit.

Each race round sends one SOP Instance UID over 8 associations at once: 4 copies with
the same bytes, 4 each with bytes of their own. Whatever order they land in, exactly one
row is ACCEPTED and the kept file's sha256 is that row's; copies with the kept bytes are
DUPLICATE, the others CONFLICT with their bytes in quarantine and an instance.conflict event.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import select

from node.audit.models import Event, Instance, InstanceStatus
from tests.factories import make_image, write
from tests.reliability.harness import CALLING_AE, SendLog, send_paths

ROUNDS = 12
SENDERS = 8


def _sha(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _pixels(path: Path) -> bytes:
    return bytes(pydicom.dcmread(path).PixelData)


def _copies(folder: Path, study_uid: str, sop_uid: str, seeds: list[int]) -> list[Path]:
    paths = []
    for index, seed in enumerate(seeds):
        ds = make_image(study_uid, seed=seed)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"  # copies differ by pixels only
        paths.append(write(ds, folder / str(index)))
    return paths


def _rows(node: Any, sop_uid: str) -> list[Instance]:
    with node.audit.session() as session:
        rows = list(session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid)))
        session.expunge_all()
    return rows


def _check_one_truth(node: Any, sop_uid: str, sent: list[Path]) -> tuple[int, int]:
    """Exactly one ACCEPTED row whose sha256 is the kept file's; every other copy classified by its bytes."""
    rows = _rows(node, sop_uid)
    accepted = [row for row in rows if row.status == InstanceStatus.ACCEPTED]
    assert len(accepted) == 1 and len(rows) == len(sent), [(r.status, r.reason) for r in rows]
    kept = accepted[0]
    assert _sha(kept.spool_path or "") == kept.sha256, "the kept file is not the accepted row's copy"
    assert len({row.sha256 for row in rows}) == len(set(map(_pixels, sent)))  # equal copies hash alike
    conflicts = 0
    for row in rows:
        if row.status == InstanceStatus.DUPLICATE:
            assert row.sha256 == kept.sha256 and row.spool_path == kept.spool_path
        elif row.status == InstanceStatus.CONFLICT:
            conflicts += 1
            assert row.sha256 != kept.sha256 and "quarantine" in (row.spool_path or "")
            assert _sha(row.spool_path or "") == row.sha256, "the quarantined file is not the conflicting copy"
            assert kept.sha256[:16] in (row.reason or "") and row.sha256 and row.sha256[:16] in (row.reason or "")
        else:
            assert row is kept
    return len(rows) - 1 - conflicts, conflicts


def _send_at_once(port: int, paths: list[Path]) -> list[SendLog]:
    """One association per file, all released from one barrier."""
    logs = [SendLog() for _ in paths]
    start = threading.Barrier(len(paths))

    def send(index: int) -> None:
        start.wait(10)
        logs[index] = send_paths(port, [paths[index]], calling_ae=CALLING_AE)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(paths))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return logs


def test_concurrent_copies_keep_one_truth(running_node: Any, tmp_path: Path) -> None:
    node = running_node(allowed_calling_aets=[CALLING_AE])
    study_uid = generate_uid()
    totals = [0, 0]
    for round_ in range(ROUNDS):
        sop_uid = generate_uid()
        seeds = [round_ * 100] * 4 + [round_ * 100 + k for k in range(1, SENDERS - 3)]
        paths = _copies(tmp_path / str(round_), study_uid, sop_uid, seeds)
        logs = _send_at_once(node.port, paths)
        assert [list(log.statuses.values()) for log in logs] == [[0]] * len(paths), [log.error for log in logs]
        duplicates, conflicts = _check_one_truth(node, sop_uid, paths)
        totals[0] += duplicates
        totals[1] += conflicts
    # 3 copies share the kept bytes only when one of the 4 identical ones won; the 4 distinct ones
    # always differ from each other, so at least 4 conflicts per round
    assert totals[1] >= 4 * ROUNDS
    with node.audit.session() as session:
        events = session.scalars(select(Event).where(Event.kind == "instance.conflict")).all()
        assert len(events) == totals[1]
        assert all({"kept_sha256", "conflict_sha256", "quarantine_path", "why_kept"} <= set(e.details or {})
                   for e in events)  # fmt: skip


def test_same_instance_in_a_second_study_is_a_conflict(running_node: Any, tmp_path: Path) -> None:
    node = running_node(allowed_calling_aets=[CALLING_AE])
    sop_uid, first_study, second_study = generate_uid(), generate_uid(), generate_uid()
    first = _copies(tmp_path / "a", first_study, sop_uid, [7])
    second = _copies(tmp_path / "b", second_study, sop_uid, [7])  # same pixels, another study
    assert list(send_paths(node.port, first, calling_ae=CALLING_AE).statuses.values()) == [0]
    assert list(send_paths(node.port, second, calling_ae=CALLING_AE).statuses.values()) == [0]
    rows = _rows(node, sop_uid)
    assert [row.status for row in rows] == [InstanceStatus.ACCEPTED, InstanceStatus.CONFLICT]
    assert rows[0].study_uid == first_study and "already stored in study" in (rows[1].reason or "")
    assert not node.spool.instance_path(second_study, sop_uid).exists(), "a second accepted file was written"
    assert _sha(rows[0].spool_path or "") == rows[0].sha256 and Path(rows[1].spool_path or "").is_file()
