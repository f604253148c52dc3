"""Read just enough of a received data set to file and audit it, without decoding pixels.

The SCP stores the bytes exactly as received; this module only checks that they
are a data set we can understand and pulls out the identifiers.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.uid import UID

from node.errors import InstanceRejectedError, StoreStatus
from node.limits import ResourceLimits, check_encoded, check_image_header

_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010
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


def read_header(
    data: bytes, expected_sop_class: str, expected_sop_instance: str, limits: ResourceLimits | None = None
) -> InstanceHeader:
    """Parse the encoded data set (file meta + body) and check it is whole, consistent and within limits.

    Raises ``InstanceRejectedError`` with CANNOT_UNDERSTAND for data we cannot
    parse or that lacks pixel bytes it declares, DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    when the data set contradicts the C-STORE request, and EXCEEDS_RESOURCE_LIMIT
    (checked before pydicom parses or inflates anything) for an instance over a limit.
    """
    limits = limits or ResourceLimits()
    check_encoded(data, limits)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=False)
        transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
        _check_lengths(ds, len(data))  # on the raw elements: the loop below replaces every one
        for _element in ds:  # decode every value once: a wrong VR or length fails here, not later
            pass
        header = _identifiers(ds, transfer_syntax)
    except InstanceRejectedError:
        raise
    except Exception as error:  # untrusted bytes: pydicom, zlib and struct raise many types
        # Only the error's type: pydicom's messages can quote element values (patient names).
        raise InstanceRejectedError(
            StoreStatus.CANNOT_UNDERSTAND, f"unreadable data set ({type(error).__name__})"
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


def _identifiers(ds: pydicom.Dataset, transfer_syntax: str) -> InstanceHeader:
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
    )


def _check_lengths(ds: pydicom.Dataset, total_bytes: int) -> None:
    """Every top-level element holds the bytes it declared, in an even length, and the last one ends the data.

    pydicom reads a cut-off data set without complaint, dropping or shortening its
    last elements, and takes odd lengths and undefined lengths on any element;
    comparing declared lengths and positions catches a cut, and PS3.5 7.1 says which
    lengths are allowed. Must run before any element is decoded: only the raw
    elements pydicom read still carry their declared length and position.
    """
    encapsulated = ds.file_meta.TransferSyntaxUID.is_encapsulated
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
            raise InstanceRejectedError(
                StoreStatus.CANNOT_UNDERSTAND,
                f"element {element.tag} has an odd length ({element.length} bytes)",
            )
        last_end = element.value_tell + element.length
    deflated = ds.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian
    if last_end is not None and not deflated and last_end != total_bytes:
        raise InstanceRejectedError(
            StoreStatus.CANNOT_UNDERSTAND,
            f"the last element ends at byte {last_end} but the data has {total_bytes} (truncated?)",
        )


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
