"""The SCs' Pixel Data is set by us (one copy), not encoded by highdicom (two): the objects are the same."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pytest
from pydicom import Dataset

from node.results import secondary_capture
from node.results.build import build_results
from tests.node.test_results import make_fake_job

# made from the clock: differ between two builds a second apart
_CLOCK = {"ContentDate", "ContentTime", "SeriesDate", "SeriesTime", "DateOfSecondaryCapture",
          "TimeOfSecondaryCapture", "InstanceCreationDate", "InstanceCreationTime", "ContributionDateTime"}  # fmt: skip


def _differences(ours: Dataset, theirs: Dataset, where: str = "") -> list[str]:
    found = []
    for tag in sorted(set(ours.keys()) | set(theirs.keys())):
        mine, other = ours.get(tag), theirs.get(tag)
        element = mine if mine is not None else other
        if element.keyword in _CLOCK:
            continue
        if mine is None or other is None or mine.VR != other.VR:
            found.append(f"{where}{element.keyword}: present or VR differs")
        elif mine.VR == "SQ":
            if len(mine.value) != len(other.value):
                found.append(f"{where}{element.keyword}: {len(mine.value)} items, not {len(other.value)}")
            for number, (a, b) in enumerate(zip(mine.value, other.value, strict=False)):
                found.extend(_differences(a, b, f"{where}{element.keyword}[{number}]."))
        elif mine.value != other.value:
            found.append(f"{where}{element.keyword}: {str(mine.value)[:40]} != {str(other.value)[:40]}")
    return found


@pytest.mark.parametrize("size", [257, 300])
def test_pixel_data_set_once_gives_highdicom_s_objects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """Built with the one-pixel stand-in and with the whole picture encoded by highdicom: equal objects.

    The SCs' Pixel Data is compared with what highdicom's own encoding of the picture made.
    """
    fake = make_fake_job(tmp_path, size=size)
    ours = build_results(fake.spool.results, fake.job_id)
    encoded: list[bytes] = []
    original = hd.sc.SCImage

    def recording(*args: object, **kwargs: object) -> hd.sc.SCImage:
        sc = original(*args, **kwargs)  # type: ignore[arg-type]
        encoded.append(sc.PixelData)
        return sc

    monkeypatch.setattr(secondary_capture, "_stand_in", lambda pixels: pixels)
    monkeypatch.setattr(secondary_capture.hd.sc, "SCImage", recording)
    theirs = build_results(fake.spool.results, fake.job_id)
    assert len(ours) == len(theirs) == 4 and len(encoded) == 3
    for mine, other in zip(ours, theirs, strict=True):
        assert _differences(mine.file_meta, other.file_meta) == []
        assert _differences(mine, other) == []
    overlay, side_by_side, cine, _ = ours
    assert overlay.PixelData == encoded[0] and side_by_side.PixelData == encoded[1]
    assert cine.PixelData[: len(encoded[2])] == encoded[2]  # the cine's first frame, as highdicom encoded it
