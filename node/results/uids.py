"""Deterministic UIDs for result objects, so a retry rebuilds the very same instances.

A UID is uuid5 of (source SOP Instance UID, model version, object kind) under
the 2.25 root. Sending a rebuilt object again therefore reaches the PACS with
a SOP Instance UID it already holds (it keeps one copy), never a second copy.
Series are keyed by the study instead of one image, so every result of a
study and model version shares one series per kind.
"""

from __future__ import annotations

import enum
import uuid

from highdicom import UID

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/gvr-node/gvr-node/results")


class ObjectKind(enum.StrEnum):
    """One result object made from one source image."""

    OVERLAY = "overlay-sc"
    SIDE_BY_SIDE = "side-by-side-sc"
    CINE = "cine-sc"
    REPORT = "report-sr"


class SeriesKind(enum.StrEnum):
    """One result series in the source's study."""

    RATIONALE = "rationale"
    CINE = "cine"
    REPORT = "report"


def _uid(*parts: str) -> UID:
    for part in parts:
        if not part:
            raise ValueError(f"UID parts must be non-empty, got {parts!r}")
    return UID.from_uuid(str(uuid.uuid5(_NAMESPACE, "|".join(parts))))


def instance_uid(source_sop_instance_uid: str, model_version: str, kind: ObjectKind | str) -> UID:
    """The SOP Instance UID of the ``kind`` object made from one source image by one model version."""
    return _uid("instance", source_sop_instance_uid, model_version, ObjectKind(kind).value)


def series_uid(study_instance_uid: str, model_version: str, kind: SeriesKind | str) -> UID:
    """The Series Instance UID of one result series of a study for one model version."""
    return _uid("series", study_instance_uid, model_version, SeriesKind(kind).value)


def tracking_uid(source_sop_instance_uid: str, model_version: str) -> UID:
    """The SR measurement group's tracking UID (one finding per source image)."""
    return _uid("tracking", source_sop_instance_uid, model_version)


def device_uid(model_name: str, model_version: str) -> UID:
    """The algorithm as an SR observer device: one UID per model name and version."""
    return _uid("device", model_name, model_version)
