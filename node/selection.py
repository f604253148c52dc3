"""Which received images the node analyses: selection rules as data, not expressions.

A study's instances are checked one by one; each ineligible one gets a reason so
the audit trail says why a study produced no job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

# Our own result objects carry this Manufacturer: the loop guard never analyses them.
RESULT_MANUFACTURER = "gvr-node"
RESULT_SERIES_PREFIX = "GVR "
_NEVER_ANALYSED_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture (and its multi-frame variants .7.x)
    "1.2.840.10008.5.1.4.1.1.88.",  # Structured Reports
)
_HEADER_TAGS = [
    "SOPClassUID", "Modality", "BodyPartExamined", "ViewPosition", "ImageType",
    "Manufacturer", "SeriesDescription", "NumberOfFrames", "SamplesPerPixel",
]  # fmt: skip


@dataclass(frozen=True)
class SelectionRule:
    """Frontal chest radiographs: CR/DX, chest or unstated, PA/AP or unstated, not derived."""

    modalities: frozenset[str] = field(default_factory=lambda: frozenset({"CR", "DX"}))
    body_parts: frozenset[str] = field(default_factory=lambda: frozenset({"CHEST"}))
    view_positions: frozenset[str] = field(default_factory=lambda: frozenset({"PA", "AP"}))

    def __post_init__(self) -> None:
        if not self.modalities:
            raise ValueError("a selection rule needs at least one modality")

    def reason_to_skip(self, ds: pydicom.Dataset) -> str | None:
        """None when the image is eligible, else a short reason for the audit trail."""
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class.startswith(_NEVER_ANALYSED_CLASSES) or _is_own_result(ds):
            return "produced by this node or a derived object class (loop guard)"
        modality = str(ds.get("Modality", "")).upper()
        if modality not in self.modalities:
            return f"modality {modality or 'absent'} not in {sorted(self.modalities)}"
        body_part = str(ds.get("BodyPartExamined", "")).upper()
        if body_part and body_part not in self.body_parts:
            return f"body part {body_part} not in {sorted(self.body_parts)}"
        view = str(ds.get("ViewPosition", "")).upper()
        if view and view not in self.view_positions:
            return f"view position {view} is not frontal ({sorted(self.view_positions)})"
        image_type = [str(value).upper() for value in ds.get("ImageType", [])]
        if image_type and image_type[0] == "DERIVED":
            return "ImageType is DERIVED"
        return None


def _is_own_result(ds: pydicom.Dataset) -> bool:
    manufacturer = str(ds.get("Manufacturer", ""))
    description = str(ds.get("SeriesDescription", ""))
    return manufacturer == RESULT_MANUFACTURER or description.startswith(RESULT_SERIES_PREFIX)


def read_selection_header(path: Path) -> pydicom.Dataset:
    """The few attributes selection needs, without reading pixels."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (InvalidDicomError, OSError, ValueError, EOFError) as error:
        raise ValueError(f"cannot read spooled instance {path.name}: {error}") from error
