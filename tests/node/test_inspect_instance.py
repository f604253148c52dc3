"""node.inspect_instance: element lengths that lie are refused with a reason naming the element.

Each case is a real data set built with pydicom, encoded as the SCP hands it to the
ingest path (preamble, file meta, body), then edited at byte level in one place.
"""

from __future__ import annotations

import io
import logging
import struct
from collections.abc import Callable
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from node.audit.db import AuditDB
from node.audit.migrate import upgrade
from node.audit.models import Instance, InstanceStatus
from node.errors import InstanceRejectedError, StoreStatus
from node.ingest import Ingestor, StoreRequest
from node.inspect_instance import read_header
from node.spool import Spool
from tests.factories import make_image

KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"  # no pixel data: only the length check sees a cut
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


def _encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _document() -> Dataset:
    """A data set of a class without pixel data: nothing after the header reveals a cut."""
    ds = make_image(generate_uid(), sop_class=KEY_OBJECT_SELECTION, modality="KO", view=None, body_part=None)
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
                    "BitsStored", "HighBit", "PixelRepresentation", "PixelData", "ImageType"):  # fmt: skip
        del ds[keyword]
    return ds


def _refusal(data: bytes, ds: Dataset) -> InstanceRejectedError:
    with pytest.raises(InstanceRejectedError) as refused:
        read_header(data, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    assert refused.value.status == StoreStatus.CANNOT_UNDERSTAND
    return refused.value


def _with_short_length(data: bytes, header: bytes, length: int) -> bytes:
    """The element whose tag and VR are ``header`` (explicit VR, 2-byte length) now declares ``length``."""
    at = data.index(header)
    return data[: at + 6] + struct.pack("<H", length) + data[at + 8 :]


def test_read_header_element_longer_than_data_refused() -> None:
    """PatientID claims 65520 bytes in a data set of a few hundred: refused naming (0010,0020)."""
    ds = _document()
    data = _with_short_length(_encoded(ds), b"\x10\x00\x20\x00LO", 0xFFF0)
    reason = _refusal(data, ds).reason
    assert "(0010,0020)" in reason and "65520" in reason


def test_read_header_element_longer_than_image_refused_naming_it() -> None:
    """The same lie in an image: the reason names the lying element, not only the missing pixels."""
    ds = make_image(generate_uid())
    data = _with_short_length(_encoded(ds), b"\x10\x00\x20\x00LO", 0xFFF0)
    assert "(0010,0020)" in _refusal(data, ds).reason


def test_read_header_truncated_last_element_refused() -> None:
    """A data set cut inside its last element (a UID that still reads as a valid one)."""
    ds = _document()
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1234567890123456789012345678901234"
    data = _encoded(ds)
    assert data.rstrip(b"\x00").endswith(b"901234")  # the series UID is the last element
    reason = _refusal(data[:-6], ds).reason
    assert "(0020,000E)" in reason and "truncated" in reason


def test_read_header_cut_after_pixel_data_refused() -> None:
    """Whole pixel data, but the trailing padding after it is cut short."""
    ds = make_image(generate_uid())
    ds.DataSetTrailingPadding = b"\x00" * 64
    reason = _refusal(_encoded(ds)[:-10], ds).reason
    assert "(FFFC,FFFC)" in reason


def _with_odd_patient_id(data: bytes) -> bytes:
    """PatientID 'TESTID01' re-declared as the 7 bytes 'TESTID0', as some old modalities write values."""
    at = data.index(b"\x10\x00\x20\x00LO")
    assert data[at + 8 : at + 16] == b"TESTID01"
    return data[: at + 6] + struct.pack("<H", 7) + b"TESTID0" + data[at + 16 :]


def test_read_header_odd_length_accepted_with_note() -> None:
    """PS3.5 7.1.1 wants even lengths, but pydicom, dcmtk and Orthanc read odd ones: accepted, with a note."""
    ds = make_image(generate_uid())
    header = read_header(_with_odd_patient_id(_encoded(ds)), str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert len(header.notes) == 1 and "(0010,0020)" in header.notes[0] and "odd" in header.notes[0]
    assert read_header(_encoded(ds), str(ds.SOPClassUID), str(ds.SOPInstanceUID)).notes == ()


def test_ingest_odd_length_accepted_and_audited_with_note(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Through Ingestor.receive: success, an ACCEPTED row whose reason names the element, a warning log line."""
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    upgrade(url)
    ingestor = Ingestor(Spool(tmp_path / "spool"), AuditDB(url), "test")
    ds = make_image(generate_uid())
    data = _with_odd_patient_id(_encoded(ds))
    with caplog.at_level(logging.WARNING, logger="node.ingest"):
        result = ingestor.receive(StoreRequest(data, str(ds.SOPClassUID), str(ds.SOPInstanceUID), None))
    assert result.status == StoreStatus.SUCCESS
    with ingestor.audit.session() as session:
        rows = session.query(Instance).all()
    assert [row.status for row in rows] == [InstanceStatus.ACCEPTED]
    assert "(0010,0020)" in (rows[0].reason or "") and "odd" in (rows[0].reason or "")
    assert Path(str(rows[0].spool_path)).read_bytes() == data
    assert any("(0010,0020)" in record.getMessage() for record in caplog.records)


def test_read_header_undefined_length_outside_sequence_refused() -> None:
    """Undefined length is for sequences and encapsulated pixel data only, not an OB element of native data."""
    ds = make_image(generate_uid())
    data = _encoded(ds)
    element = b"\x42\x00\x11\x00OB\x00\x00\xff\xff\xff\xff" + b"ABCD" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    at = data.index(PIXEL_DATA_TAG)  # (0042,0011) goes just before the pixel data, in tag order
    reason = _refusal(data[:at] + element + data[at:], ds).reason
    assert "(0042,0011)" in reason and "undefined length" in reason


def test_ingest_length_lie_refused_and_audited_with_reason(tmp_path: Path) -> None:
    """Through Ingestor.receive: 0xC000, a REJECTED row whose reason names the element, no spooled file."""
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    upgrade(url)
    ingestor = Ingestor(Spool(tmp_path / "spool"), AuditDB(url), "test")
    ds = _document()
    data = _with_short_length(_encoded(ds), b"\x10\x00\x20\x00LO", 0xFFF0)
    result = ingestor.receive(StoreRequest(data, str(ds.SOPClassUID), str(ds.SOPInstanceUID), None))
    assert result.status == StoreStatus.CANNOT_UNDERSTAND
    with ingestor.audit.session() as session:
        rows = session.query(Instance).all()
    assert [row.status for row in rows] == [InstanceStatus.REJECTED]
    assert "(0010,0020)" in (rows[0].reason or "")
    assert not list((tmp_path / "spool").rglob("*.dcm"))


def _sequences(ds: Dataset) -> Dataset:
    """Defined- and undefined-length sequences, nested, and trailing padding after the pixels."""
    ds.ReferencedImageSequence = [Dataset(), Dataset()]
    ds.ReferencedImageSequence[0].ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedImageSequence[1].PurposeOfReferenceCodeSequence = [Dataset()]
    ds.ReferencedImageSequence[1].PurposeOfReferenceCodeSequence[0].CodeValue = "121311"
    ds.DataSetTrailingPadding = b"\x00" * 16
    return ds


VALID_VARIANTS: dict[str, Callable[[], Dataset]] = {
    "image": lambda: make_image(generate_uid()),
    "image with sequences": lambda: _sequences(make_image(generate_uid())),
    "no pixel data": _document,
}


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                                    DeflatedExplicitVRLittleEndian])  # fmt: skip
@pytest.mark.parametrize("variant", sorted(VALID_VARIANTS))
def test_read_header_valid_encodings_accepted(variant: str, syntax: str) -> None:
    """Whole data sets in every uncompressed syntax, with sequences of both length kinds: accepted."""
    ds = VALID_VARIANTS[variant]()
    ds.file_meta.TransferSyntaxUID = syntax
    undefined = syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)  # the others keep defined lengths
    for element in ds.iterall():
        if element.VR == "SQ":
            element.is_undefined_length = undefined  # the element's flag: pydicom 3 ignores the Sequence's
    header = read_header(_encoded(ds), str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    assert header.sop_instance_uid == ds.SOPInstanceUID


def test_read_header_pydicom_encapsulated_files_accepted() -> None:
    """Encapsulated pixel data (undefined length, items) and undefined-length sequences from pydicom's own files."""
    folder = Path(pydicom.data.__file__).parent / "test_files"  # shipped with pydicom: nothing downloaded
    for name in ("JPEG2000.dcm", "SC_rgb_jpeg_gdcm.dcm", "MR_small_RLE.dcm", "rtplan.dcm", "CT_small.dcm",
                 "image_dfl.dcm", "reportsi.dcm", "test-SR.dcm", "waveform_ecg.dcm"):  # fmt: skip
        data = (folder / name).read_bytes()
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        read_header(data, str(ds.SOPClassUID), str(ds.SOPInstanceUID))


def test_read_header_number_of_wrong_length_refused() -> None:
    """Rows sent as UL with 2 bytes: a number whose length is no multiple of its size still fails to decode."""
    ds = make_image(generate_uid())
    data = _encoded(ds)
    at = data.index(b"\x28\x00\x10\x00US")
    reason = _refusal(data[: at + 4] + b"UL" + data[at + 6 :], ds).reason
    assert "BytesLengthException" in reason


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_read_header_file_meta_with_extra_elements_accepted(syntax: str) -> None:
    """A meta group with optional elements (and a deflated body, read by dcmread) gives the same header."""
    ds = make_image(generate_uid())
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.SourceApplicationEntityTitle = "PACS"
    ds.file_meta.PrivateInformationCreatorUID = "1.2.3.4"
    ds.file_meta.PrivateInformation = b"\x01\x02"
    header = read_header(_encoded(ds), str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    assert (header.transfer_syntax, header.sop_instance_uid) == (syntax, ds.SOPInstanceUID)


def _referencing(ds: Dataset, undefined: bool) -> Dataset:
    """Two referenced images, each an item of (0008,1140); sequence and item lengths defined or not."""
    ds.ReferencedImageSequence = [Dataset(), Dataset()]
    for item in ds.ReferencedImageSequence:
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        item.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.12345678901234567890"
        item.is_undefined_length_sequence_item = undefined
    ds["ReferencedImageSequence"].is_undefined_length = undefined  # on the element: the Sequence's flag is not written
    return ds


@pytest.mark.parametrize("undefined", [False, True], ids=["defined lengths", "undefined lengths"])
def test_read_header_element_longer_than_its_item_refused(undefined: bool) -> None:
    """A UID in the first item claims 6 bytes more than it holds, reading into what follows: refused, named.

    With defined lengths the item's end names the element; with undefined ones only the sequence
    is known (a lie that swallows exactly the delimiters between two items reads as one item).
    """
    ds = _referencing(make_image(generate_uid()), undefined)
    data = _encoded(ds)
    at = data.index(b"\x08\x00\x55\x11UI")  # the first item's ReferencedSOPInstanceUID
    length = struct.unpack_from("<H", data, at + 6)[0]
    reason = _refusal(_with_short_length(data, b"\x08\x00\x55\x11UI", length + 6), ds).reason
    assert "(0008,1140)" in reason and (undefined or "element (0008,1155)" in reason)


@pytest.mark.parametrize("cut", [8, 16], ids=["sequence delimiter", "item and sequence delimiters"])
def test_read_header_cut_inside_undefined_length_sequence_refused(cut: int) -> None:
    """A document whose last element, an undefined-length sequence, loses its delimiters: refused as truncated."""
    ds = _document()
    ds.ContentSequence = [Dataset()]
    ds.ContentSequence[0].ValueType = "TEXT"
    ds.ContentSequence[0].is_undefined_length_sequence_item = True
    ds["ContentSequence"].is_undefined_length = True
    data = _encoded(ds)
    closing = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    assert data.endswith(closing)  # the content sequence is the last element
    reason = _refusal(data[:-cut], ds).reason
    assert "(0040,A730)" in reason and "truncated" in reason
