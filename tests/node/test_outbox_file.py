"""Result objects written straight to the outbox (node.results.outbox_file)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid

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
