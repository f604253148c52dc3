"""node.limits: the checks that run before anything is decoded or inflated (issue 9, part 3)."""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from inference.preprocess import UnusableImageError, spooled_dicom_to_model_image
from node.audit.db import AuditDB
from node.audit.migrate import upgrade
from node.config import Settings
from node.errors import InstanceRejectedError, StoreStatus
from node.ingest import Ingestor, StoreRequest
from node.inspect_instance import read_header
from node.limits import LimitExceededError, ResourceLimits, check_encoded, check_structure, codestream_size
from node.spool import Spool
from tests.factories import make_image
from tests.reliability.bombs import all_bombs, jpeg_frame, sequence_items_bomb


def _encoded(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_settings_defaults_are_the_limits_defaults() -> None:
    assert ResourceLimits.from_settings(Settings()) == ResourceLimits()


def test_ordinary_instances_pass(tmp_path: Path) -> None:
    """Explicit, implicit and deflated encodings with nested sequences stay within the defaults."""
    ds = make_image("1.2.3.4")
    ds.ReferencedImageSequence = [pydicom.Dataset() for _ in range(3)]
    ds.ReferencedImageSequence[0].ReferencedSOPClassUID = "1.2.3"
    ds.ReferencedImageSequence[0].PurposeOfReferenceCodeSequence = [pydicom.Dataset()]
    for syntax in (pydicom.uid.ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                   pydicom.uid.DeflatedExplicitVRLittleEndian):  # fmt: skip
        ds.file_meta.TransferSyntaxUID = syntax
        check_encoded(_encoded(ds), ResourceLimits())
        check_encoded(_encoded(ds), ResourceLimits(max_sequence_items=4, max_sequence_depth=2))  # exactly
        with pytest.raises(LimitExceededError, match="max_sequence_items"):
            check_encoded(_encoded(ds), ResourceLimits(max_sequence_items=3))
        with pytest.raises(LimitExceededError, match="max_sequence_depth"):
            check_encoded(_encoded(ds), ResourceLimits(max_sequence_depth=1))


def test_implicit_vr_item_bomb_is_counted() -> None:
    """Without VRs on the wire, a sequence is known by its undefined length (or the dictionary)."""
    item = b"\xfe\xff\x00\xe0" + struct.pack("<I", 0)
    body = b"\x08\x00\x40\x11\xff\xff\xff\xff" + item * 100 + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    with pytest.raises(LimitExceededError):
        check_structure(body, explicit=False, limits=ResourceLimits(max_sequence_items=99))
    defined = b"\x08\x00\x40\x11" + struct.pack("<I", len(item) * 100) + item * 100
    with pytest.raises(LimitExceededError):
        check_structure(defined, explicit=False, limits=ResourceLimits(max_sequence_items=99))
    check_structure(defined, explicit=False, limits=ResourceLimits(max_sequence_items=100))


def test_codestream_size_reads_jpeg_headers() -> None:
    assert codestream_size(jpeg_frame(12000, 11000)) == (12000, 11000)
    assert codestream_size(b"not a codestream") is None


def test_instance_size_limit_refused_and_audited(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    upgrade(url)
    ingestor = Ingestor(Spool(tmp_path / "spool"), AuditDB(url), "test", ResourceLimits(max_instance_bytes=4096))
    ds = make_image("1.2.3.4")
    result = ingestor.receive(StoreRequest(_encoded(ds), str(ds.SOPClassUID), str(ds.SOPInstanceUID), None))
    assert result.status == StoreStatus.EXCEEDS_RESOURCE_LIMIT


def test_worker_path_refuses_every_bomb_before_decoding(tmp_path: Path) -> None:
    """The worker's own check (default limits), on files the node never saw."""
    for bomb in all_bombs() + [sequence_items_bomb(30_000, deflated=False)]:
        with pytest.raises(UnusableImageError) as refused:
            spooled_dicom_to_model_image(bomb.write(tmp_path), 64, ResourceLimits())
        assert bomb.limit in str(refused.value), bomb.kind


def _nested(depth: int) -> pydicom.Dataset:
    """An image holding ``depth`` sequences, one inside the other, one item each."""
    ds = make_image(generate_uid())
    holder = ds
    for _ in range(depth):
        item = pydicom.Dataset()
        item.CodeValue = "121311"
        holder.PurposeOfReferenceCodeSequence = [item]
        holder = item
    return ds


def _group_length(data: bytes, value: int) -> bytes:
    return data[:140] + struct.pack("<I", value) + data[144:]


def _without_transfer_syntax(data: bytes) -> bytes:
    """The file meta minus (0002,0010), its group length still true: pydicom guesses the body's encoding."""
    at = data.index(b"\x02\x00\x10\x00UI", 132)
    removed = 8 + struct.unpack_from("<H", data, at + 6)[0]
    data = data[:at] + data[at + removed :]
    return _group_length(data, struct.unpack_from("<I", data, 140)[0] - removed)


META_TRICKS: dict[str, Callable[[bytes], bytes]] = {
    "meta as written": lambda data: data,
    "group length past the end": lambda data: _group_length(data, len(data) - 144),
    "group length zero": lambda data: _group_length(data, 0),
    "group length short by one element": lambda data: _group_length(data, struct.unpack_from("<I", data, 140)[0] - 26),
    "no transfer syntax": _without_transfer_syntax,
}


# without its transfer syntax pydicom reads deflated bytes as they are: there is no bomb to find in that pair
TRICKED_SYNTAXES = [(trick, syntax) for trick in sorted(META_TRICKS)
                    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                                   DeflatedExplicitVRLittleEndian)
                    if not (trick == "no transfer syntax" and syntax == DeflatedExplicitVRLittleEndian)]  # fmt: skip


@pytest.mark.parametrize(("trick", "syntax"), TRICKED_SYNTAXES, ids=lambda value: getattr(value, "name", value))
def test_sequence_limits_hold_whatever_the_file_meta_claims(trick: str, syntax: str) -> None:
    """Depth and item bombs behind a lying group length or a meta without transfer syntax: 0xC001, the limit named."""
    ds = _nested(4)
    ds.file_meta.TransferSyntaxUID = syntax
    data = META_TRICKS[trick](_encoded(ds))
    for limits, name in ((ResourceLimits(max_sequence_depth=3), "max_sequence_depth"),
                         (ResourceLimits(max_sequence_items=3), "max_sequence_items")):  # fmt: skip
        with pytest.raises(LimitExceededError, match=name) as refused:
            read_header(data, str(ds.SOPClassUID), str(ds.SOPInstanceUID), limits)
        assert refused.value.status == StoreStatus.EXCEEDS_RESOURCE_LIMIT
    check_encoded(data, ResourceLimits(max_sequence_depth=4, max_sequence_items=4))  # counted exactly, not twice


def test_meta_without_transfer_syntax_refused_with_its_reason() -> None:
    """Within the limits, a file meta without (0002,0010) is refused by name, not as a Python error."""
    ds = make_image(generate_uid())
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    data = _without_transfer_syntax(_encoded(ds))
    with pytest.raises(InstanceRejectedError, match=r"names no transfer syntax \(0002,0010\)") as refused:
        read_header(data, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    assert refused.value.status == StoreStatus.CANNOT_UNDERSTAND
