"""Read just enough of a received data set to file and audit it, without decoding pixels.

The SCP stores the bytes exactly as received; this module only checks that they
are a data set we can understand and pulls out the identifiers.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import pydicom
from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    PrivateTransferSyntaxes,
)

from node.encoded_walk import KNOWN_VRS
from node.errors import InstanceRejectedError, StoreStatus
from node.limits import ResourceLimits, check_encoded, check_image_header

_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
# Decoding these cannot fail with pydicom's lenient reading defaults (``_decode_what_can_fail``)
_TEXT_AND_BYTE_VRS = frozenset(
    ("AE", "AS", "CS", "DA", "DT", "TM", "UI", "UR", "SH", "LO", "ST", "LT", "UC", "UT",
     "OB", "OD", "OF", "OL", "OV", "OW")
)  # fmt: skip
_NUMBER_SIZES = {"US": 2, "SS": 2, "UL": 4, "SL": 4, "FL": 4, "FD": 8, "SV": 8, "UV": 8}
_STORAGE = "1.2.840.10008.5.1.4.1.1."
# Image storage SOP classes whose IOD requires pixel data (a header cut at an element
# boundary still parses; only this catches it).
_PIXEL_CLASSES = frozenset(
    _STORAGE + suffix
    for suffix in (
        "1", "1.1", "1.1.1", "1.2", "1.2.1", "1.3", "1.3.1", "2", "2.1", "3.1", "4", "4.1", "6.1", "6.2",
        "7", "7.1", "7.2", "7.3", "7.4", "12.1", "12.2", "20", "128", "481.1",
    )
)

@dataclass(frozen=True)
class InstanceHeader:
    """The identifiers of one received instance (no patient data)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    modality: str | None
    notes: tuple[str, ...] = ()  # what is off in the encoding but read anyway (odd lengths), for the audit row


def read_header(
    data: bytes, expected_sop_class: str, expected_sop_instance: str, limits: ResourceLimits | None = None
) -> InstanceHeader:
    """Parse the encoded data set (file meta + body) and check it is whole, consistent and within limits.

    Returns the identifiers, with ``notes`` on what was read although PS3.5 forbids it.
    Raises ``InstanceRejectedError`` with CANNOT_UNDERSTAND for data we cannot
    parse or that lacks pixel bytes it declares, DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    when the data set contradicts the C-STORE request, and EXCEEDS_RESOURCE_LIMIT
    (checked before pydicom parses or inflates anything) for an instance over a limit.
    """
    limits = limits or ResourceLimits()
    nested_fault = check_encoded(data, limits)  # its walk also compares lengths inside sequences
    try:
        ds = _parse(data)
        if not ds.file_meta.get("TransferSyntaxUID"):
            raise InstanceRejectedError(
                StoreStatus.CANNOT_UNDERSTAND, "the file meta names no transfer syntax (0002,0010): cannot read it"
            )
        transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
        notes = _check_lengths(ds, len(data))  # on the raw elements: decoding replaces them
        if nested_fault is not None:  # after the top-level check: a top-level lie is named first
            raise InstanceRejectedError(StoreStatus.CANNOT_UNDERSTAND, nested_fault)
        _decode_what_can_fail(ds)  # a wrong VR or length fails here, not later
        header = _identifiers(ds, transfer_syntax, notes)
    except InstanceRejectedError:
        raise
    except Exception as error:  # untrusted bytes: pydicom, zlib and struct raise many types
        # Only the error's type: pydicom's messages can quote element values (patient names).
        # A lie inside a sequence, when the walk saw one, says better why it failed.
        raise InstanceRejectedError(
            StoreStatus.CANNOT_UNDERSTAND, nested_fault or f"unreadable data set ({type(error).__name__})"
        ) from error
    if header.sop_instance_uid != expected_sop_instance:
        raise InstanceRejectedError(
            StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            f"SOPInstanceUID {header.sop_instance_uid} differs from the request's {expected_sop_instance}",
        )
    if header.sop_class_uid != expected_sop_class:
        raise InstanceRejectedError(
            StoreStatus.DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            f"SOPClassUID {header.sop_class_uid} differs from the request's {expected_sop_class}",
        )
    check_image_header(ds, limits)  # before _check_pixel_data_complete reads the pixel value
    _check_pixel_data_complete(ds)
    return header


def _parse(data: bytes) -> pydicom.Dataset:
    """What ``pydicom.dcmread`` returns, without pydicom re-reading a file meta group we read exactly.

    issue 12: pydicom's file meta reading cost ~0.15 ms per instance, for the one value
    used (the transfer syntax). Anything unusual in the meta goes to ``dcmread`` whole.
    """
    meta = _plain_file_meta(data)
    if meta is None:
        return pydicom.dcmread(io.BytesIO(data), force=False)
    syntax, body_offset = meta
    buffer = io.BytesIO(data)
    buffer.seek(body_offset)
    ds = read_dataset(buffer, syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _plain_file_meta(data: bytes) -> tuple[UID, int] | None:
    """(Transfer Syntax UID, offset of the body) when pydicom would read the meta element for element the same.

    That is: preamble and prefix, explicit VR elements of known VRs up to the first tag of
    another group, a 4-byte group length first, a UI transfer syntax, and a body that starts
    with neither a command group nor nothing; and a syntax ``read_partial`` reads without a
    special case (deflated and private syntaxes go to ``dcmread``).
    """
    if data[128:132] != b"DICM" or data[132:140] != b"\x02\x00\x00\x00UL\x04\x00":
        return None
    position, syntax = 132, None
    while position + 12 <= len(data):
        group, element = struct.unpack_from("<HH", data, position)
        if group != 2:
            break
        vr = data[position + 4 : position + 6]
        if vr not in KNOWN_VRS:
            return None
        if vr in _LONG_VRS:
            length, header = struct.unpack_from("<I", data, position + 8)[0], 12
        else:
            length, header = struct.unpack_from("<H", data, position + 6)[0], 8
        if element == 0x0010:
            value = data[position + header : position + header + length]
            if vr != b"UI" or b"\\" in value:
                return None
            syntax = UID(value.decode("latin-1").rstrip("\0 "))
        position += header + length
    if syntax is None or position + 12 > len(data) or data[position : position + 2] == b"\x00\x00":
        return None
    if syntax in (DeflatedExplicitVRLittleEndian, *PrivateTransferSyntaxes):
        return None
    return syntax, position


def _identifiers(ds: pydicom.Dataset, transfer_syntax: str, notes: tuple[str, ...]) -> InstanceHeader:
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = str(ds.get(keyword, "") or "")
        if not value or not UID(value).is_valid:
            raise InstanceRejectedError(StoreStatus.CANNOT_UNDERSTAND, f"missing or invalid {keyword} {value!r}")
    return InstanceHeader(
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        transfer_syntax=transfer_syntax,
        modality=str(ds.get("Modality", "") or "") or None,
        notes=notes,
    )


def _check_lengths(ds: pydicom.Dataset, total_bytes: int) -> tuple[str, ...]:
    """Every top-level element holds the bytes it declared and the last one ends the data; returns notes.

    pydicom reads a cut-off data set without complaint, dropping or shortening its
    last elements, and takes undefined lengths on any element; comparing declared
    lengths and positions catches a cut, and PS3.5 7.2 says where an undefined length
    is allowed. Odd lengths (PS3.5 7.1.1 forbids them) are written by real old
    modalities and read by pydicom, dcmtk and Orthanc alike: noted, not refused.
    Must run before any element is decoded: only the raw elements pydicom read still
    carry their declared length and position.
    """
    encapsulated = ds.file_meta.TransferSyntaxUID.is_encapsulated
    odd: list[RawDataElement] = []
    last_end = None
    for element in ds.elements():
        if not isinstance(element, RawDataElement):
            last_end = None  # parsed already (a sequence): its end is not known, nothing to compare
            continue
        held = len(element.value) if element.value is not None else 0
        if element.length == _UNDEFINED:
            if not (encapsulated and element.tag == _PIXEL_DATA):
                raise InstanceRejectedError(
                    StoreStatus.CANNOT_UNDERSTAND,
                    f"element {element.tag} has an undefined length, allowed only for sequences and "
                    "encapsulated pixel data",
                )
            last_end = element.value_tell + held + 8  # + the sequence delimitation item
            continue
        if held < element.length:
            raise InstanceRejectedError(
                StoreStatus.CANNOT_UNDERSTAND,
                f"element {element.tag} declares {element.length} bytes but holds {held} (truncated?)",
            )
        if element.length % 2:
            odd.append(element)
        last_end = element.value_tell + element.length
    deflated = ds.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian
    if last_end is not None and not deflated and last_end != total_bytes:
        raise InstanceRejectedError(
            StoreStatus.CANNOT_UNDERSTAND,
            f"the last element ends at byte {last_end} but the data has {total_bytes} (truncated?)",
        )
    return _odd_length_notes(odd)


def _odd_length_notes(odd: list[RawDataElement]) -> tuple[str, ...]:
    """One note for the audit row, however many elements: it names the first and counts the rest."""
    if not odd:
        return ()
    others = f" and {len(odd) - 1} more element(s)" if len(odd) > 1 else ""
    note = f"element {odd[0].tag} has an odd length ({odd[0].length} bytes){others}"
    return (f"{note}; PS3.5 7.1.1 requires even lengths, read as sent",)


def _decode_what_can_fail(ds: pydicom.Dataset) -> None:
    """Decode every top-level value whose decoding could raise, so that it raises here.

    issue 12: decoding all ~25 elements of a radiograph cost ~0.5 ms of CPU per instance.
    With pydicom's lenient reading defaults, text and byte values decode whatever they
    hold (bad characters are replaced, bad values warned about) and a number fails only
    on a length that is not a multiple of its size: those are checked, not decoded. All
    else (PN, IS, DS, AT, SQ, UN, private, ambiguous or unknown VRs) is decoded by pydicom.
    """
    lenient = (
        config.settings.reading_validation_mode != config.RAISE
        and not config.datetime_conversion
        and config.data_element_callback is None
    )
    for element in list(ds.elements()):
        if not (lenient and isinstance(element, RawDataElement) and _decoding_cannot_fail(element)):
            ds[element.tag]  # pydicom converts and keeps the element


def _decoding_cannot_fail(element: RawDataElement) -> bool:
    if element.tag.is_private or element.value is None:
        return False
    vr = element.VR
    if vr is None:  # implicit VR: pydicom takes the dictionary's VR, as here
        try:
            vr = dictionary_VR(element.tag)
        except KeyError:
            return False
    if vr in _TEXT_AND_BYTE_VRS:
        return True
    size = _NUMBER_SIZES.get(vr)
    return size is not None and len(element.value) % size == 0


def _check_pixel_data_complete(ds: pydicom.Dataset) -> None:
    """A truncated transfer leaves fewer pixel bytes than the header declares."""
    element = ds.get((0x7FE0, 0x0010))
    if element is None:
        # pydicom drops a pixel element cut short by the end of the data; Rows comes before it.
        image_class = str(ds.SOPClassUID) in _PIXEL_CLASSES
        if ("Rows" in ds or image_class) and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise InstanceRejectedError(
                StoreStatus.CANNOT_UNDERSTAND, "image carries no pixel data (truncated?)"
            )
        return
    try:
        value = element.value
    except (ValueError, EOFError, OSError) as error:
        raise InstanceRejectedError(
            StoreStatus.CANNOT_UNDERSTAND, f"unreadable pixel data ({type(error).__name__})"
        ) from error
    if value is None:
        return
    if "Rows" in ds and (not ds.Rows or not ds.get("Columns")):
        raise InstanceRejectedError(
            StoreStatus.CANNOT_UNDERSTAND, f"image declares {ds.Rows} x {ds.get('Columns')} pixels"
        )
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        if element.is_undefined_length and not _encapsulated_is_whole(value):
            raise InstanceRejectedError(StoreStatus.CANNOT_UNDERSTAND, "encapsulated pixel data is truncated")
        return
    expected = _native_pixel_bytes(ds)
    if expected is not None and len(value) < expected:
        raise InstanceRejectedError(
            StoreStatus.CANNOT_UNDERSTAND,
            f"pixel data holds {len(value)} bytes; Rows x Columns x frames x samples needs {expected}",
        )


def _native_pixel_bytes(ds: pydicom.Dataset) -> int | None:
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422":
        samples = 2  # chroma shared by each pair of pixels
    return (rows * columns * samples * frames * bits + 7) // 8


def _encapsulated_is_whole(value: bytes) -> bool:
    """Walk the items (tag, length, bytes) and require every one to be complete."""
    offset = 0
    while offset + 8 <= len(value):
        tag = value[offset : offset + 4]
        length = int.from_bytes(value[offset + 4 : offset + 8], "little")
        if tag == b"\xfe\xff\xdd\xe0":
            return True
        if tag != b"\xfe\xff\x00\xe0" or offset + 8 + length > len(value):
            return False
        offset += 8 + length
    # pydicom strips the closing delimiter when it reads the value: whole if items ended exactly
    return offset == len(value)
