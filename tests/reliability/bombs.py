"""Resource bombs: small files that claim a lot (issue 9), each built to one trick.

Every bomb is a Part 10 file whose body goes on the wire as it is (pynetdicom in
chunked mode, or storescu). ``limit`` names the setting that must stop it, which
the refusal's audit reason quotes. Sizes follow the issue's reports: a 64x64 CR
with PixelSpacing ``1\\0.000000001``; a ~2 KB JPEG whose frame header claims
12000 x 12000; a deflated data set of zeros (~130 KB -> 8192^2 x 16 bit); a
deflated sequence of 1.5 M tiny items; and sequences nested 5,000 deep.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEGBaseline8Bit

from node.scp import file_meta_group
from tests.reliability.harness import phi_image

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
_PREAMBLE = b"\x00" * 128 + b"DICM"
_ITEM, _ITEM_END, _SEQUENCE_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0", b"\xfe\xff\xdd\xe0"
_LANGUAGE_CODE_SEQUENCE = b"\x08\x00\x06\x00SQ\x00\x00"  # (0008,0006): sorts before every tag make_image sets


@dataclass(frozen=True)
class Bomb:
    kind: str
    sop_class: str
    sop_instance: str
    study_uid: str
    transfer_syntax: str
    body: bytes = field(repr=False)
    limit: str  # the setting whose check must refuse it, or words of the reason (quoted in the audit row)

    @property
    def encoded(self) -> bytes:
        return _PREAMBLE + file_meta_group(self.sop_class, self.sop_instance, self.transfer_syntax) + self.body

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.kind}.dcm"
        path.write_bytes(self.encoded)
        return path


def _cr(**attributes: object) -> Dataset:
    ds = phi_image(modality="CR", sop_class=CR_IMAGE)
    for name, value in attributes.items():
        setattr(ds, name, value)
    return ds


def _body(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The data set without file meta, in ``transfer_syntax`` (never deflated here)."""
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    raw = buffer.getvalue()
    meta_length = struct.unpack("<I", raw[132 + 8 : 132 + 12])[0]
    return raw[132 + 12 + meta_length :]


def _deflate(body: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)  # raw deflate, as PS3.5 A.5 says
    return packer.compress(body) + packer.flush()


def _bomb(kind: str, ds: Dataset, body: bytes, limit: str, transfer_syntax: str = ExplicitVRLittleEndian) -> Bomb:
    return Bomb(kind, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), transfer_syntax,
                body, limit)  # fmt: skip


def spacing_bomb() -> Bomb:
    """64 x 64 CR whose rows are 10^9 times further apart than its columns: resampling wanted 14.9 TiB."""
    ds = _cr(PixelSpacing=["1", "0.000000001"])
    return _bomb("pixel_spacing_1e9", ds, _body(ds), "max_pixel_spacing_ratio")


def jpeg_frame(rows: int, columns: int) -> bytes:
    """A real 64 x 64 baseline JPEG (~1 KB) whose SOF0 header is rewritten to claim ``rows x columns``."""
    buffer = io.BytesIO()
    pixels = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=90)
    frame = bytearray(buffer.getvalue())
    sof = frame.index(b"\xff\xc0")
    struct.pack_into(">HH", frame, sof + 5, rows, columns)
    return bytes(frame)


def jpeg_bomb(dicom_rows: int) -> Bomb:
    """A JPEG claiming 12000 x 12000; the data set says ``dicom_rows`` square (12000: the header agrees)."""
    ds = _cr(Rows=dicom_rows, Columns=dicom_rows, BitsAllocated=8, BitsStored=8, HighBit=7)
    ds.PixelData = encapsulate([jpeg_frame(12000, 12000)])
    ds["PixelData"].VR = "OB"
    limit = "max_image_pixels" if dicom_rows == 12000 else "compressed frame's header claims 12000 x 12000"
    return _bomb(f"jpeg_claims_12000_rows_{dicom_rows}", ds, _body(ds, JPEGBaseline8Bit), limit, JPEGBaseline8Bit)


def deflated_zeros_bomb(side: int = 8192) -> Bomb:
    """``side``^2 16-bit zeros, deflated: ~130 KB on the wire, 128 MB inflated (and 8192^2 pixels claimed)."""
    ds = _cr(Rows=side, Columns=side)
    ds.PixelData = bytes(side * side * 2)
    return _bomb(f"deflated_zeros_{side}", ds, _deflate(_body(ds)), "max_inflated_mb", DeflatedExplicitVRLittleEndian)


def sequence_items_bomb(items: int = 1_500_000, deflated: bool = True) -> Bomb:
    """A sequence of ``items`` tiny items (each one CodeValue): ~27 MB inflated, ~2 GB as pydicom objects."""
    ds = _cr()
    item = _ITEM + struct.pack("<I", 10) + b"\x08\x00\x00\x01SH\x02\x00AB"
    sequence = _LANGUAGE_CODE_SEQUENCE + b"\xff\xff\xff\xff" + item * items + _SEQUENCE_END + b"\x00" * 4
    body = sequence + _body(ds)
    if not deflated:
        return _bomb(f"sequence_{items}_items", ds, body, "max_sequence_items")
    return _bomb(f"deflated_sequence_{items}_items", ds, _deflate(body), "max_sequence_items",
                 DeflatedExplicitVRLittleEndian)  # fmt: skip


def nesting_bomb(depth: int = 5000) -> Bomb:
    """Sequences nested ``depth`` deep (each holding one undefined-length item), all properly closed."""
    ds = _cr()
    opening = (_LANGUAGE_CODE_SEQUENCE + b"\xff\xff\xff\xff" + _ITEM + b"\xff\xff\xff\xff") * depth
    closing = (_ITEM_END + b"\x00" * 4 + _SEQUENCE_END + b"\x00" * 4) * depth
    return _bomb(f"sequences_nested_{depth}", ds, opening + closing + _body(ds), "max_sequence_depth")


def all_bombs() -> list[Bomb]:
    return [spacing_bomb(), jpeg_bomb(12000), jpeg_bomb(64), deflated_zeros_bomb(), sequence_items_bomb(),
            nesting_bomb()]  # fmt: skip
