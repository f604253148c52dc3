"""The bad-input corpus: data sets a PACS (or an attacker) might send, each built to one flaw.

Each ``BadInstance`` is a DICOM file (preamble, file meta, body) whose file meta
names what the C-STORE request will say; pynetdicom sends the body as it is
(no re-encoding), so the node sees exactly these bytes. ``expect`` says what a
correct node does:

* ``refused``: a failure status and a REJECTED instance row in the audit DB;
* ``no_context``: the presentation context is not accepted, nothing is sent;
* ``not_analysed``: stored (success) but its study gets no job, with an event.

Raw-PDU and silent-peer cases live in the test module: they are not data sets.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    generate_uid,
)

from node.scp import file_meta_group
from tests.factories import CT_IMAGE, DX_FOR_PRESENTATION
from tests.reliability.harness import phi_image

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"  # a query SOP class, not storage
_PREAMBLE = b"\x00" * 128 + b"DICM"


@dataclass(frozen=True)
class BadInstance:
    kind: str
    sop_class: str  # as the request (file meta) states it
    sop_instance: str
    transfer_syntax: str
    body: bytes
    expect: str = "refused"

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.kind}.dcm"
        path.write_bytes(_PREAMBLE + file_meta_group(self.sop_class, self.sop_instance, self.transfer_syntax) + self.body)
        return path


def encode_body(ds: Dataset, little_endian: bool = True) -> bytes:
    """The data set without file meta, explicit VR, as a C-STORE carries it."""
    buffer = io.BytesIO()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little_endian else ExplicitVRBigEndian
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    raw = buffer.getvalue()
    meta_length = struct.unpack("<I", raw[132 + 8 : 132 + 12])[0]
    return raw[132 + 12 + meta_length :]


def _image(**attributes: object) -> Dataset:
    ds = phi_image()
    for name, value in attributes.items():
        setattr(ds, name, value)
    return ds


def _bad(kind: str, ds: Dataset, mutate: Callable[[bytes], bytes] = lambda b: b, **options: str) -> BadInstance:
    return BadInstance(
        kind=kind,
        sop_class=options.get("sop_class", str(ds.SOPClassUID)),
        sop_instance=options.get("sop_instance", str(ds.SOPInstanceUID)),
        transfer_syntax=options.get("transfer_syntax", ExplicitVRLittleEndian),
        body=mutate(encode_body(ds)),
        expect=options.get("expect", "refused"),
    )


def _swap_vr(tag: bytes, old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    def mutate(body: bytes) -> bytes:
        at = body.index(tag + old)
        return body[: at + 4] + new + body[at + 6 :]

    return mutate


ROWS, STUDY_UID, PATIENT_NAME = b"\x28\x00\x10\x00", b"\x20\x00\x0d\x00", b"\x10\x00\x10\x00"
SOP_CLASS = b"\x08\x00\x16\x00"


def build_corpus() -> list[BadInstance]:
    """Every kind once; at least 20 of them are data sets the node must refuse."""
    seq_unterminated = _image()
    seq_unterminated.ReferencedImageSequence = [Dataset()]
    no_pixels = _image()
    del no_pixels.PixelData
    no_study = _image()
    del no_study.StudyInstanceUID
    head_ct = _image(Modality="CT", BodyPartExamined="HEAD", SOPClassUID=CT_IMAGE)
    head_ct.file_meta.MediaStorageSOPClassUID = UID(CT_IMAGE)
    ds = _image()
    corpus = [
        _bad("truncated_in_pixel_data", _image(), lambda b: b[:-700]),
        _bad("truncated_in_header", _image(), lambda b: b[:90]),
        _bad("truncated_mid_element_value", _image(), lambda b: b[: b.index(STUDY_UID) + 20]),
        _bad("empty_data_set", _image(), lambda b: b""),
        _bad("random_bytes", _image(), lambda b: bytes((i * 73 + 11) % 256 for i in range(len(b)))),
        _bad("wrong_vr_unknown_code_on_rows", _image(), _swap_vr(ROWS, b"US", b"ZZ")),
        _bad("wrong_vr_ul_on_rows", _image(), _swap_vr(ROWS, b"US", b"UL")),
        _bad("wrong_vr_ob_on_rows", _image(), _swap_vr(ROWS, b"US", b"OB")),
        _bad("wrong_vr_us_on_study_uid", _image(), _swap_vr(STUDY_UID, b"UI", b"US")),
        _bad("wrong_vr_fd_on_patient_name", _image(), _swap_vr(PATIENT_NAME, b"PN", b"FD")),
        _bad("wrong_vr_sq_on_sop_class", _image(), _swap_vr(SOP_CLASS, b"UI", b"SQ")),
        _bad("element_length_past_end", _image(), _length_past_end),
        _bad("missing_pixel_data", no_pixels),
        _bad("absurd_dimensions", _image(Rows=65535, Columns=65535)),
        _bad("zero_rows", _image(Rows=0)),
        _bad("bits_allocated_64", _image(BitsAllocated=64)),
        _bad("missing_study_uid", no_study),
        _bad("invalid_study_uid", _image(StudyInstanceUID="1.2.abc.4")),
        _bad("sop_instance_differs_from_request", _image(), sop_instance=generate_uid()),
        _bad("sop_class_differs_from_request", _image(SOPClassUID=CT_IMAGE), sop_class=DX_FOR_PRESENTATION),
        _bad("unterminated_sequence", seq_unterminated, _unterminated_sequence),
        _bad("deflate_stream_corrupt", ds, lambda b: zlib.compress(b)[:40] + b"\xff" * 64,
             transfer_syntax=DeflatedExplicitVRLittleEndian),
        _bad("big_endian_transfer_syntax", _image(), transfer_syntax=ExplicitVRBigEndian, expect="no_context"),
        _bad("jpeg_ls_transfer_syntax", _image(), transfer_syntax=JPEGLSLossless, expect="no_context"),
        _bad("query_sop_class_as_store", _image(), sop_class=PATIENT_ROOT_FIND, expect="no_context"),
        _bad("non_chest_image", head_ct, expect="not_analysed"),
    ]
    return corpus


def _length_past_end(body: bytes) -> bytes:
    """Patient Name declares 0xFFF0 bytes; the data set ends long before."""
    at = body.index(PATIENT_NAME + b"PN")
    return body[: at + 6] + struct.pack("<H", 0xFFF0) + body[at + 8 :]


def _unterminated_sequence(body: bytes) -> bytes:
    """An undefined-length sequence whose delimiter never comes: the body ends inside it."""
    tag = b"\x08\x00\x40\x11SQ\x00\x00"  # (0008,1140) Referenced Image Sequence
    at = body.index(tag)
    return body[: at + 8] + b"\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + b"\x08\x00\x50\x11UI\x08\x00"
