"""Secondary Capture images in the source's own study: the overlay, original | healthy, the cine.

highdicom's ``SCImage`` builds a valid single-frame SC; we then copy the
Patient and General Study modules from the source exactly (a PACS files a
result with another PatientID in another study), and add what SCImage leaves
out: Laterality, SourceImageSequence, BurnedInAnnotation, the series
description that our loop guard recognises. The cine becomes a Multi-frame
Grayscale Byte SC with a Cine module, so viewers scroll or play it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import UID, ExplicitVRLittleEndian

from node.results.source_header import PATIENT_AND_STUDY_KEYWORDS, SourceHeader
from node.selection import RESULT_MANUFACTURER, RESULT_SERIES_PREFIX

MULTIFRAME_GREYSCALE_BYTE_SC = UID("1.2.840.10008.5.1.4.1.1.7.2")
# a PA chest as displayed (rows to the patient's left, columns to the feet): only to satisfy SCImage,
# whose orientation is replaced by an empty value when the source states none
DEFAULT_ORIENTATION = ("L", "F")
CINE_FRAME_TIME_MS = 250.0
_DIRECTIONS = re.compile(r"^[APRLHF]{1,3}$")

_REQUIRED_EMPTY_IF_ABSENT = ("PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                             "ReferringPhysicianName", "StudyID", "AccessionNumber")  # fmt: skip


@dataclass(frozen=True)
class ResultIdentity:
    """Where a result object goes: its series and its own UID and number."""

    series_instance_uid: str
    series_number: int
    series_description: str
    sop_instance_uid: str
    instance_number: int

    def __post_init__(self) -> None:
        if not self.series_description.startswith(RESULT_SERIES_PREFIX):
            raise ValueError(
                f"series description {self.series_description!r} must start with {RESULT_SERIES_PREFIX!r}: "
                "the node's loop guard recognises its own results by it"
            )
        if len(self.series_description) > 64:
            raise ValueError(f"series description {self.series_description!r} is longer than 64 characters")
        if self.series_number < 1 or self.instance_number < 1:
            raise ValueError(f"series and instance numbers must be >= 1, got {self.series_number}, "
                             f"{self.instance_number}")  # fmt: skip
        for uid in (self.series_instance_uid, self.sop_instance_uid):
            if not uid or len(uid) > 64:
                raise ValueError(f"invalid UID {uid!r}: 1-64 characters")


@dataclass(frozen=True)
class AlgorithmEquipment:
    """The model that made the result: it names the equipment of every object we build."""

    model_name: str
    model_version: str

    def __post_init__(self) -> None:
        if not self.model_name or not self.model_version:
            raise ValueError("model name and version are required to label result objects")

    def contributing(self) -> hd.ContributingEquipment:
        """Contributing Equipment item (SOP Common module), as IHE AI Results asks."""
        return hd.ContributingEquipment(
            manufacturer=RESULT_MANUFACTURER,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.model_name[:64],
            software_versions=self.model_version[:64],
            contribution_description="Generative Visual Rationale heart failure model",
        )


def copy_patient_and_study(source: Dataset, target: Dataset) -> None:
    """Copy the Patient, Patient Study and General Study modules exactly (Type 2 left empty if absent).

    ``source`` is a cleaned header (``source_header.clean_source_header``): what it
    holds is valid, so it is copied verbatim.
    """
    if "SpecificCharacterSet" in source:
        target.SpecificCharacterSet = source.SpecificCharacterSet
    for keyword in PATIENT_AND_STUDY_KEYWORDS:
        if keyword in source:
            target[keyword] = source[keyword]
        elif keyword in target and keyword not in _REQUIRED_EMPTY_IF_ABSENT:
            del target[keyword]
    for keyword in _REQUIRED_EMPTY_IF_ABSENT:
        if keyword not in source:
            setattr(target, keyword, "")


def set_series_date(ds: Dataset) -> None:
    """Series Date/Time = when the result was made (viewers group and sort series by them)."""
    if "ContentDate" in ds and "ContentTime" in ds:
        ds.SeriesDate, ds.SeriesTime = ds.ContentDate, ds.ContentTime


def _laterality(source: Dataset) -> str:
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(source.get(keyword, "") or "")
        if value in ("R", "L"):
            return value
    return ""


def source_orientation(source: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation when it names two directions (A, P, R, L, H, F), else None."""
    value = source.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    row, column = (str(part) for part in value)
    if all(_DIRECTIONS.match(part) for part in (row, column)):
        return row, column
    return None


def _source_reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    return item


def _stand_in(pixels: np.ndarray) -> np.ndarray:
    """What highdicom encodes in place of the picture: its top left pixel (same type and samples).

    SCImage derives from its array only Rows, Columns and the Image Pixel attributes of its
    type and samples, then copies it twice into Pixel Data (``flatten().tobytes()``); ``_sc_image``
    sets Rows, Columns and Pixel Data from the picture after, in one copy (35 MB less to copy
    for the overlay of a 3000 px source, 21 MB for its side-by-side).
    """
    return pixels[:1, :1]


def _sc_image(
    header: SourceHeader,
    pixels: np.ndarray,
    identity: ResultIdentity,
    equipment: AlgorithmEquipment,
    derivation: str,
) -> hd.sc.SCImage:
    """An SC of ``pixels`` (uint8; 2-D greyscale or RGB) in the source's study, fully labelled."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(f"SC pixels must be uint8 greyscale or RGB, got {pixels.dtype} {pixels.shape}")
    source = header.dataset
    sc = hd.sc.SCImage(
        pixel_array=_stand_in(pixels),
        photometric_interpretation="RGB" if pixels.ndim == 3 else "MONOCHROME2",
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid=source.StudyInstanceUID,
        series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=identity.instance_number,
        manufacturer=RESULT_MANUFACTURER,
        patient_orientation=source_orientation(source) or DEFAULT_ORIENTATION,
        transfer_syntax_uid=ExplicitVRLittleEndian,  # Orthanc's preview renders it; colour JPEG 2000 it cannot
        contributing_equipment=[equipment.contributing()],
    )
    # Image Pixel module: the picture itself, copied once (highdicom's flatten().tobytes() copies twice)
    sc.Rows, sc.Columns = pixels.shape[0], pixels.shape[1]
    sc.PixelData = np.ascontiguousarray(pixels).tobytes()
    copy_patient_and_study(source, sc)
    if source_orientation(source) is None:
        del sc.PatientOrientation
        sc.add_new(0x00200020, "CS", None)  # General Image module, Type 2C: unknown, not guessed
    # General Series module
    sc.SeriesDescription = identity.series_description
    set_series_date(sc)
    if "BodyPartExamined" in source:
        sc.BodyPartExamined = source.BodyPartExamined
    laterality = _laterality(source)
    if laterality or "BodyPartExamined" not in sc:
        # Type 2C: a value for a paired part; empty when unknown; absent for an unpaired part (CHEST)
        sc.Laterality = laterality
    # General Equipment module
    sc.ManufacturerModelName = equipment.model_name[:64]
    sc.SoftwareVersions = equipment.model_version[:64]
    # SC Equipment module: made on a workstation, not digitised from film or video
    sc.ConversionType = "WSD"
    # General Image module
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = derivation[:1024]
    sc.SourceImageSequence = Sequence([_source_reference(source)])
    # lossy pixels stay lossy: the source's history, ratio and method carry over
    header.lossy.apply(sc)
    return sc


def overlay_sc(
    source: SourceHeader, pixels: np.ndarray, identity: ResultIdentity, equipment: AlgorithmEquipment
) -> Dataset:
    """The radiograph with its rationale overlay, colour bar and caption (RGB, uncompressed)."""
    if pixels.ndim != 3:
        raise ValueError(f"the overlay SC is RGB [rows, columns, 3], got shape {pixels.shape}")
    return _sc_image(source, pixels, identity, equipment,
                     "GVR rationale (original minus healthy reconstruction) blended over the source image")  # fmt: skip


def side_by_side_sc(
    source: SourceHeader, pixels: np.ndarray, identity: ResultIdentity, equipment: AlgorithmEquipment
) -> Dataset:
    """Original | the source minus the rationale (the healthy counterfactual), with the caption (greyscale)."""
    if pixels.ndim != 2:
        raise ValueError(f"the side-by-side SC is greyscale [rows, columns], got shape {pixels.shape}")
    return _sc_image(source, pixels, identity, equipment,
                     "source image beside the source minus the model's rationale (healthy counterfactual)")  # fmt: skip


def cine_sc(
    source: SourceHeader,
    frames: np.ndarray,
    identity: ResultIdentity,
    equipment: AlgorithmEquipment,
    frame_time_ms: float = CINE_FRAME_TIME_MS,
) -> Dataset:
    """A Multi-frame Grayscale Byte SC of ``frames`` (uint8 [F, rows, columns]) with a Cine module."""
    if frames.dtype != np.uint8 or frames.ndim != 3 or frames.shape[0] < 2:
        raise ValueError(
            f"cine frames must be uint8 [frames >= 2, rows, columns], got {frames.dtype} {frames.shape}"
        )
    if frame_time_ms <= 0:
        raise ValueError(f"frame time {frame_time_ms} ms must be positive")
    ds = _sc_image(source, frames[0], identity, equipment,
                   "model decodings along the latent path from the source's decoding to its healthy counterfactual")  # fmt: skip
    # SOP Common module: the multi-frame class
    ds.SOPClassUID = MULTIFRAME_GREYSCALE_BYTE_SC
    ds.file_meta.MediaStorageSOPClassUID = MULTIFRAME_GREYSCALE_BYTE_SC
    # SC Image module belongs to the single-frame IOD only
    for keyword in ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"):
        if keyword in ds:
            del ds[keyword]
    # Cine and Multi-frame modules
    ds.NumberOfFrames = frames.shape[0]
    ds.FrameIncrementPointer = (0x0018, 0x1063)  # Frame Time
    ds.FrameTime = f"{frame_time_ms:g}"
    ds.CineRate = max(1, round(1000.0 / frame_time_ms))
    # SC Multi-frame Image module
    ds.PresentationLUTShape = "IDENTITY"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    data = np.ascontiguousarray(frames).tobytes()
    ds.PixelData = data + b"\0" if len(data) % 2 else data  # OB values have even length
    return ds
