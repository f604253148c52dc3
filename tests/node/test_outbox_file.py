"""Result objects written straight to the outbox (node.results.outbox_file), and the in-place overlay arithmetic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from node.results import overlay
from node.results.build import encode
from node.results.outbox_file import make_folder, write_dataset_file
from node.spool import Spool, SpoolFullError
from tests.factories import make_image


def test_file_holds_what_encode_gives_and_no_temporary_is_left(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    ds = make_image(generate_uid(), size=300)
    folder = spool.outbox / "job-1"
    make_folder(folder)
    write_dataset_file(spool, ds, folder / "a.dcm")
    write_dataset_file(spool, ds, folder / "a.dcm")  # a rebuild replaces it
    assert (folder / "a.dcm").read_bytes() == encode(ds)
    assert list(spool.tmp.iterdir()) == []


def test_free_space_floor_refuses_and_leaves_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=1 << 62)
    make_folder(spool.outbox / "job-1")
    with pytest.raises(SpoolFullError):
        write_dataset_file(spool, make_image(generate_uid()), spool.outbox / "job-1" / "a.dcm")
    assert list(spool.tmp.iterdir()) == [] and not (spool.outbox / "job-1" / "a.dcm").exists()


def _reference_blend(base: np.ndarray, rationale: np.ndarray, scale: float) -> np.ndarray:
    """The formulae as first written (full-size table lookup, boolean masks)."""
    index = np.clip(rationale * np.float32(127.5 / scale) + np.float32(128.0), 0, 255).astype(np.uint8)
    weight = overlay._TINT_WEIGHTS.take(index)
    grey = np.rint(np.clip(base, 0.0, 1.0) * 255.0).astype(np.uint8)
    blended = np.repeat(grey[..., None], 3, axis=-1)
    tinted = weight > 0
    w = weight[tinted][:, None]
    mixed = grey[tinted][:, None].astype(np.uint16) * (256 - w) + overlay._TINT_COLOURS[index[tinted]] * w + 128
    blended[tinted] = (mixed >> 8).astype(np.uint8)
    return blended


@pytest.mark.parametrize("scale", [0.05, 0.4, 2.0])
def test_in_place_arithmetic_gives_the_same_pixels(scale: float) -> None:
    rng = np.random.default_rng(3)
    base = rng.random((257, 311), dtype=np.float32) * 1.2 - 0.1  # out of [0, 1] too
    rationale = rng.normal(0.0, 0.2, base.shape).astype(np.float32)
    assert np.array_equal(overlay.blend(base, rationale, scale), _reference_blend(base, rationale, scale))
    healthy = overlay.healthy_image(base, rationale)
    assert healthy.dtype == np.float32
    assert np.array_equal(healthy, np.clip(base - rationale, 0.0, 1.0).astype(np.float32))
    for image in (base, base.astype(np.float64)):
        assert np.array_equal(overlay._to_uint8(image), np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8))


def test_untinted_range_is_one_run() -> None:
    low, high = overlay._UNTINTED_LOW, overlay._UNTINTED_HIGH
    assert low < 128 < high and (overlay._TINT_WEIGHTS[low : high + 1] == 0).all()
    with pytest.raises(ValueError, match="one run"):
        overlay._untinted_range(np.array([0, 1, 0, 1], dtype=np.uint16))
