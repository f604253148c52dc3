"""Resource limits on received instances, checked from headers before anything is decoded or inflated.

A few hundred bytes can claim gigabytes: a deflated data set of zeros, a sequence of
millions of empty items, a JPEG whose frame header says 12000 x 12000, a PixelSpacing
of ``1\\0.000000001`` that makes resampling allocate terabytes (issue 9). Every check
here reads only headers, or inflates at most the limit plus one byte, so what a check
costs is bounded by the limit itself. The SCP runs ``check_encoded`` and
``check_image_header`` before it keeps an instance; the worker runs them again before
it decodes pixels (its settings, or the file, may differ from the node's).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from node.encoded_walk import SequenceWalk
from node.errors import LimitExceededError

if TYPE_CHECKING:
    from pydicom import Dataset

    from node.config import Settings

MB = 1024 * 1024
# LimitExceededError lives beside its base in node.errors (node.encoded_walk raises it too); callers import it here
__all__ = ["MB", "LimitExceededError", "ResourceLimits", "bounded_inflate", "check_encoded", "check_image_header",
           "check_spacing", "check_structure", "codestream_size", "first_fragment", "pixel_spacing"]  # fmt: skip


@dataclass(frozen=True)
class ResourceLimits:
    """What one instance may claim. The defaults hold any real chest radiograph with room to spare."""

    max_instance_bytes: int = 256 * MB
    max_pixels: int = 64_000_000  # Rows x Columns x frames; a 43 cm detector at 100 um is 18.5 M
    max_pixel_bytes: int = 256 * MB  # decoded: pixels x samples x BitsAllocated / 8
    max_inflated_bytes: int = 64 * MB  # a deflated data set, inflated
    max_sequence_items: int = 20_000  # all sequence items and pixel fragments of one data set
    max_sequence_depth: int = 16
    max_spacing_ratio: float = 10.0  # the larger pixel spacing over the smaller one

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ValueError(f"resource limit {name} must be positive, got {value!r}")

    @classmethod
    def from_settings(cls, settings: Settings) -> ResourceLimits:
        return cls(
            max_instance_bytes=settings.max_instance_mb * MB,
            max_pixels=settings.max_image_pixels,
            max_pixel_bytes=settings.max_pixel_data_mb * MB,
            max_inflated_bytes=settings.max_inflated_mb * MB,
            max_sequence_items=settings.max_sequence_items,
            max_sequence_depth=settings.max_sequence_depth,
            max_spacing_ratio=settings.max_pixel_spacing_ratio,
        )


# -- the encoded instance: size, inflated size, sequence items and depth ---------------------


def check_encoded(data: bytes, limits: ResourceLimits) -> str | None:
    """Check a Part 10 encoding (preamble, file meta, body) before pydicom parses it.

    Returns the first length found lying inside a sequence (a sentence naming the element),
    for ``read_header`` to refuse; None when none. Raises ``LimitExceededError``. The walk covers what pydicom parses: the file meta and
    command groups as it reads them, then the body from where it starts, in the encoding it
    takes (``node.encoded_walk``). Bytes this walk cannot follow are left to the parser,
    which refuses them as unreadable: the walk only ever refuses what it could measure.
    """
    if len(data) > limits.max_instance_bytes:
        raise LimitExceededError(
            f"the instance is {len(data) / MB:.1f} MB; the limit is {limits.max_instance_bytes / MB:.0f} MB "
            "(max_instance_mb)"
        )
    walk = SequenceWalk(limits)
    found = walk.body(data)  # where pydicom will start reading, whatever the group length says
    if found is None:
        return walk.fault
    body: bytes | memoryview = memoryview(data)[found.offset :]
    if found.deflated:
        body = bounded_inflate(bytes(body), limits.max_inflated_bytes)
    walk.run(body, 0, found.explicit, found.little)
    return walk.fault


def bounded_inflate(deflated: bytes, max_bytes: int) -> bytes:
    """Inflate a raw deflate stream (as Deflated Explicit VR Little Endian holds it), at most ``max_bytes``."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(deflated, max_bytes + 1)
    except zlib.error:
        return b""  # not ours to judge: the parser refuses a corrupt stream as unreadable
    if len(inflated) > max_bytes or inflater.unconsumed_tail:
        raise LimitExceededError(
            f"the deflated data set ({len(deflated) / 1024:.0f} KB) inflates to more than "
            f"{max_bytes / MB:.0f} MB (max_inflated_mb)"
        )
    return inflated


def check_structure(body: bytes | memoryview, explicit: bool, limits: ResourceLimits) -> None:
    """Count sequence items (and pixel fragments) and sequence nesting of a little endian body alone."""
    SequenceWalk(limits).run(body, 0, explicit, True)


# -- the image header: pixels, decoded bytes, codestream size, spacing -----------------------


def check_image_header(ds: Dataset, limits: ResourceLimits) -> None:
    """Rows x Columns x frames, decoded bytes, the codestream's own size and the spacing ratio.

    Reads attributes only (never ``pixel_array``). Values that are not numbers are left
    to the checks that read them; a limit is only ever applied to a number.
    """
    rows, columns = _number(ds.get("Rows")), _number(ds.get("Columns"))
    if rows is None or columns is None:
        return
    frames = _number(ds.get("NumberOfFrames")) or 1
    pixels = rows * columns * frames
    if pixels > limits.max_pixels:
        raise LimitExceededError(
            f"the image claims {rows} x {columns} pixels x {frames} frame(s) = {pixels:,}; the limit is "
            f"{limits.max_pixels:,} (max_image_pixels)"
        )
    samples = _number(ds.get("SamplesPerPixel")) or 1
    bits = _number(ds.get("BitsAllocated")) or 16
    decoded = pixels * samples * bits // 8
    if decoded > limits.max_pixel_bytes:
        raise LimitExceededError(
            f"decoding the pixels would take {decoded / MB:.0f} MB; the limit is "
            f"{limits.max_pixel_bytes / MB:.0f} MB (max_pixel_data_mb)"
        )
    _check_codestream(ds, rows, columns)
    check_spacing(pixel_spacing(ds), limits)


def pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """(row, column) spacing from PixelSpacing, else ImagerPixelSpacing, else PixelAspectRatio; None if none."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "PixelAspectRatio"):
        try:
            value = ds.get(keyword)
            if value is not None and len(value) == 2:
                return float(value[0]), float(value[1])
        except (TypeError, ValueError):
            continue
    return None


def check_spacing(spacing: tuple[float, float] | None, limits: ResourceLimits) -> None:
    """Resampling to square pixels multiplies one side by the spacing ratio: bound the ratio first.

    A zero, negative or missing spacing is treated as square pixels by preprocessing, so only
    two positive values can exceed the limit.
    """
    if spacing is None or not all(value > 0 for value in spacing):
        return
    ratio = max(spacing) / min(spacing)
    if not ratio <= limits.max_spacing_ratio:  # NaN fails too
        raise LimitExceededError(
            f"pixel spacing {spacing[0]:g} x {spacing[1]:g} is {ratio:.3g} times wider one way than the other; "
            f"the limit is {limits.max_spacing_ratio:g} (max_pixel_spacing_ratio)"
        )


def _number(value: Any) -> int | None:
    try:
        return int(value) if value is not None and str(value).strip() != "" else None
    except (TypeError, ValueError):
        return None


def _check_codestream(ds: Dataset, rows: int, columns: int) -> None:
    """A compressed frame whose own header claims more pixels than Rows x Columns is refused before decoding."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_encapsulated or "PixelData" not in ds:
        return
    fragment = first_fragment(ds.PixelData)
    size = codestream_size(fragment) if fragment else None
    if size is not None and size[0] * size[1] > rows * columns:
        raise LimitExceededError(
            f"the compressed frame's header claims {size[0]} x {size[1]} pixels; the data set's Rows x Columns "
            f"is {rows} x {columns}"
        )


def first_fragment(pixel_data: bytes, head: int = 65536) -> bytes:
    """The first ``head`` bytes of the first fragment after the Basic Offset Table ('' if none)."""
    position, seen = 0, 0
    while position + 8 <= len(pixel_data):
        tag, length = pixel_data[position : position + 4], struct.unpack_from("<I", pixel_data, position + 4)[0]
        if tag != b"\xfe\xff\x00\xe0":
            return b""
        if seen == 1:
            return pixel_data[position + 8 : position + 8 + min(length, head)]
        position, seen = position + 8 + length, seen + 1
    return b""


_JPEG_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7))


def codestream_size(stream: bytes) -> tuple[int, int] | None:
    """(rows, columns) a JPEG, JPEG-LS or JPEG 2000 codestream declares, or None when not found."""
    if stream[:2] == b"\xff\xd8":
        return _jpeg_size(stream)
    at = stream.find(b"\xff\x4f\xff\x51", 0, 4096)  # J2K: SOC then SIZ (also inside a JP2 file)
    if at >= 0 and at + 24 <= len(stream):
        width, height, x_offset, y_offset = struct.unpack_from(">IIII", stream, at + 8)
        return height - y_offset, width - x_offset
    return None


def _jpeg_size(stream: bytes) -> tuple[int, int] | None:
    position = 2
    while position + 9 <= len(stream):
        if stream[position] != 0xFF:
            return None
        marker = stream[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _JPEG_SOF:
            rows, columns = struct.unpack_from(">HH", stream, position + 5)
            return rows, columns
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            position += 2
            continue
        position += 2 + struct.unpack_from(">H", stream, position + 2)[0]
    return None
