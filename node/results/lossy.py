"""Whether a source was ever lossy compressed: its results must say so too (General Image module).

An SC derived from a lossy JPEG or JPEG 2000 radiograph shows lossy pixels,
whatever its own transfer syntax: Lossy Image Compression must read "01", with
the source's ratio and method (PS3.3 C.7.6.1.1.5). The source's own attribute
is trusted when present and consistent with its transfer syntax; when absent,
a transfer syntax that can be lossy counts as lossy (saying "lossy" of a
lossless image is harmless, the reverse is not).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import VALIDATORS, format_number_as_ds

# transfer syntax -> Lossy Image Compression Method (CID 7011 defined terms)
ALWAYS_LOSSY = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG extended
    "1.2.840.10008.1.2.4.100": "ISO_13818_2",  # MPEG2
    "1.2.840.10008.1.2.4.101": "ISO_13818_2",
    "1.2.840.10008.1.2.4.102": "ISO_14496_10",  # H.264
    "1.2.840.10008.1.2.4.103": "ISO_14496_10",
    "1.2.840.10008.1.2.4.104": "ISO_14496_10",
    "1.2.840.10008.1.2.4.105": "ISO_14496_10",
    "1.2.840.10008.1.2.4.106": "ISO_14496_10",
    "1.2.840.10008.1.2.4.107": "ISO_23008_2",  # HEVC
    "1.2.840.10008.1.2.4.108": "ISO_23008_2",
}
MAYBE_LOSSY = {
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",  # JPEG 2000 (lossless or lossy)
    "1.2.840.10008.1.2.4.93": "ISO_15444_2",  # JPEG 2000 Part 2 multi-component
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",  # HTJ2K (lossless or lossy)
}


@dataclass(frozen=True)
class LossyHistory:
    """What the results' Lossy Image Compression attributes say; ``notes`` explain each inference."""

    lossy: bool
    ratios: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    notes: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (keyword, reason)

    def apply(self, ds: Dataset) -> None:
        """Set Lossy Image Compression (and its ratio and method when lossy) on a derived image."""
        ds.LossyImageCompression = "01" if self.lossy else "00"
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in ds:
                del ds[keyword]
        if self.lossy and self.ratios and len(self.ratios) == len(self.methods):
            ds.LossyImageCompressionRatio = self.ratios[0] if len(self.ratios) == 1 else list(self.ratios)
            ds.LossyImageCompressionMethod = self.methods[0] if len(self.methods) == 1 else list(self.methods)


def lossy_history(source: Dataset) -> LossyHistory:
    """The lossy-compression history of ``source`` from its attributes and its transfer syntax."""
    syntax = str(getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", "") or "")
    stated = str(source.get("LossyImageCompression", "") or "").strip()
    method = ALWAYS_LOSSY.get(syntax) or MAYBE_LOSSY.get(syntax)
    ratios, methods = _listed(source, "LossyImageCompressionRatio", "DS"), _listed(
        source, "LossyImageCompressionMethod", "CS")  # fmt: skip
    notes: list[tuple[str, str]] = []
    if stated == "01":
        lossy = True
    elif syntax in ALWAYS_LOSSY:
        lossy = True
        notes.append(("LossyImageCompression", f"source in lossy transfer syntax {syntax}: results say 01"))
    elif stated == "00":
        lossy = False
    elif method is not None:
        lossy = True
        notes.append(
            ("LossyImageCompression", f"absent; transfer syntax {syntax} may be lossy: results say 01")
        )
    else:
        lossy = False
    if not lossy:
        return LossyHistory(False, notes=tuple(notes))
    if not ratios or len(ratios) != len(methods):
        ratio = _ratio(source)
        ratios, methods = ((ratio,), (method,)) if ratio and method else ((), ())
        if ratios:
            notes.append(("LossyImageCompressionRatio", "computed from the source's pixel data size"))
    return LossyHistory(True, ratios, methods, tuple(notes))


def _listed(source: Dataset, keyword: str, vr: str) -> tuple[str, ...]:
    if keyword not in source:
        return ()
    value = source[keyword].value
    values = (
        list(value) if isinstance(value, (list, MultiValue)) else [value] if value not in (None, "") else []
    )
    texts = tuple(str(v).strip() for v in values)
    validator: Callable[[str, Any], tuple[bool, str]] = VALIDATORS[vr]
    return texts if all(validator(vr, text)[0] for text in texts) else ()


def _ratio(source: Dataset) -> str | None:
    """Uncompressed over compressed pixel bytes of an encapsulated source, as DS."""
    try:
        data = source.get("PixelData")
        frames = int(source.get("NumberOfFrames", 1) or 1)
        size = int(source.Rows) * int(source.Columns) * int(source.get("SamplesPerPixel", 1) or 1)
        uncompressed = size * frames * ((int(source.BitsAllocated) + 7) // 8)
    except (AttributeError, TypeError, ValueError):
        return None
    if not isinstance(data, bytes) or not data or uncompressed <= 0:
        return None
    return format_number_as_ds(round(uncompressed / len(data), 2))
