"""Which received images the node analyses: selection rules as data, not expressions.

Two checks, in this order. The **loop guard** (``loop_guard_reason``) is not a
setting: the node never analyses its own results, nor an object class that is
derived by nature (Secondary Capture, Structured Report, presentation states,
encapsulated documents). The **selection rule** (``SelectionRule``, built from
the ``select_*`` settings) says which modalities, body parts, view positions
and ImageType values are analysed. A study's instances are checked one by one;
each ineligible one gets a reason (peer values quoted with ``repr``) so the
audit trail says why a study produced no job.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom.errors import InvalidDicomError

if TYPE_CHECKING:
    from node.config import Settings

# Our own result objects carry this Manufacturer: the loop guard never analyses them.
RESULT_MANUFACTURER = "gvr-node"
RESULT_SERIES_PREFIX = "GVR "
NEVER_ANALYSED_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture and its multi-frame variants (.7.x)
    "1.2.840.10008.5.1.4.1.1.88",  # Structured Reports, Key Object Selection
    "1.2.840.10008.5.1.4.1.1.11",  # Softcopy Presentation States
    "1.2.840.10008.5.1.4.1.1.104",  # Encapsulated PDF, CDA, STL ...
    "1.2.840.10008.5.1.4.1.1.66",  # Raw Data, Spatial Registration, Segmentation ...
)
DEFAULT_IMAGE_TYPES = ("ORIGINAL", "DERIVED\\PRIMARY")
_HEADER_TAGS = [
    "SOPClassUID", "Modality", "BodyPartExamined", "ViewPosition", "ImageType",
    "Manufacturer", "SeriesDescription", "NumberOfFrames", "SamplesPerPixel",
]  # fmt: skip


def _upper_set(values: Iterable[str]) -> frozenset[str]:
    return frozenset(value.strip().upper() for value in values if value.strip())


@dataclass(frozen=True)
class SelectionRule:
    """Frontal chest radiographs: CR/DX, chest or unstated, PA/AP or unstated, ORIGINAL or DERIVED\\PRIMARY.

    ``image_types`` are ImageType prefixes: "ORIGINAL" accepts ORIGINAL\\PRIMARY\\...,
    "DERIVED\\PRIMARY" accepts DERIVED\\PRIMARY\\... (processed CR) but not
    DERIVED\\SECONDARY. An image without ImageType, body part or view is accepted.
    """

    modalities: frozenset[str] = field(default_factory=lambda: frozenset({"CR", "DX"}))
    body_parts: frozenset[str] = field(default_factory=lambda: frozenset({"CHEST"}))
    view_positions: frozenset[str] = field(default_factory=lambda: frozenset({"PA", "AP"}))
    image_types: frozenset[str] = field(default_factory=lambda: frozenset(DEFAULT_IMAGE_TYPES))

    def __post_init__(self) -> None:
        for name in ("modalities", "body_parts", "view_positions", "image_types"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"a selection rule needs at least one of {name}")
            object.__setattr__(self, name, _upper_set(values))

    @classmethod
    def from_settings(cls, settings: Settings) -> SelectionRule:
        return cls(
            modalities=frozenset(settings.select_modalities),
            body_parts=frozenset(settings.select_body_parts),
            view_positions=frozenset(settings.select_view_positions),
            image_types=frozenset(settings.select_image_types),
        )

    def reason_to_skip(self, ds: pydicom.Dataset) -> str | None:
        """None when the image is eligible, else a short reason for the audit trail."""
        guard = loop_guard_reason(ds)
        if guard is not None:
            return guard
        modality = str(ds.get("Modality", "") or "").upper()
        if modality not in self.modalities:
            return f"modality {modality or 'absent'!r} not in {sorted(self.modalities)}"
        body_part = str(ds.get("BodyPartExamined", "") or "").upper()
        if body_part and body_part not in self.body_parts:
            return f"body part {body_part!r} not in {sorted(self.body_parts)}"
        view = str(ds.get("ViewPosition", "") or "").upper()
        if view and view not in self.view_positions:
            return f"view position {view!r} not in {sorted(self.view_positions)}"
        image_type = _image_type(ds)
        if image_type and not any(_starts_with(image_type, accepted) for accepted in self.image_types):
            return f"ImageType {image_type} not in {sorted(self.image_types)}"
        return None


def loop_guard_reason(ds: pydicom.Dataset) -> str | None:
    """Why the node must never analyse this object (its own output, a derived class), or None."""
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if any(sop_class == prefix or sop_class.startswith(prefix + ".") for prefix in NEVER_ANALYSED_CLASSES):
        return f"SOP class {sop_class} is a derived object class (loop guard)"
    manufacturer = str(ds.get("Manufacturer", "") or "")
    description = str(ds.get("SeriesDescription", "") or "")
    if manufacturer == RESULT_MANUFACTURER or description.startswith(RESULT_SERIES_PREFIX):
        return "produced by this node (loop guard)"
    return None


def _image_type(ds: pydicom.Dataset) -> list[str]:
    value = ds.get("ImageType")
    if value is None or value == "":
        return []
    values = [value] if isinstance(value, str) else list(value)
    return [str(part).strip().upper() for part in values]


def _starts_with(image_type: list[str], accepted: str) -> bool:
    wanted = [part.strip() for part in accepted.split("\\")]
    return image_type[: len(wanted)] == wanted


def read_selection_header(path: Path) -> pydicom.Dataset:
    """The few attributes selection needs, without reading pixels."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (InvalidDicomError, OSError, ValueError, EOFError) as error:
        raise ValueError(f"cannot read spooled instance {path.name} ({type(error).__name__})") from error
