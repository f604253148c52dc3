"""Phantoms as files: DICOM Digital X-Ray images (For Presentation), as a PACS would send them, and PNGs.

The node is tested against what a hospital sends, so the phantoms are
written as complete DX objects: 12-bit pixels, a mix of MONOCHROME1
(inverted) and MONOCHROME2, PA and a few AP views, a synthetic patient and a
study and series of their own. Every UID is derived from the seed with
uuid5, so writing the same phantom twice gives the same instance.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from training.phantoms import Phantom, demographics

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
MANUFACTURER = "gvr-node phantoms"
BITS_STORED = 12
MAX_VALUE = (1 << BITS_STORED) - 1
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/gvr-node/gvr-node/phantoms")
_DICOM_STREAM = 6


def phantom_uid(seed: int, role: str) -> str:
    """A UID under 2.25 derived from (seed, role): stable across runs, distinct across phantoms and roles."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, f'{seed}/{role}').int}"


@dataclass(frozen=True)
class Acquisition:
    """How phantom ``seed`` was acquired and stored (all drawn from the seed)."""

    monochrome1: bool
    view: str  # "PA" or "AP"
    field_of_view_mm: float  # detector width covered by the image
    when: dt.datetime
    birth_date: dt.date

    @classmethod
    def for_seed(cls, seed: int) -> Acquisition:
        rng = np.random.default_rng([seed, _DICOM_STREAM])
        when = dt.datetime(2024, 1, 1, 7, 0) + dt.timedelta(
            days=int(rng.integers(0, 730)), seconds=int(rng.integers(0, 12 * 3600))
        )
        age = demographics(seed).age
        birth = when.date() - dt.timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
        return cls(
            monochrome1=bool(rng.random() < 0.35),
            view="AP" if rng.random() < 0.12 else "PA",
            field_of_view_mm=float(rng.uniform(350.0, 410.0)),
            when=when,
            birth_date=birth,
        )


def stored_pixels(image: np.ndarray, monochrome1: bool) -> np.ndarray:
    """12-bit unsigned stored values; MONOCHROME1 stores the inverse so a viewer shows the same picture."""
    values = np.rint(np.clip(image, 0.0, 1.0) * MAX_VALUE).astype(np.uint16)
    return np.asarray(MAX_VALUE - values, dtype=np.uint16) if monochrome1 else values


def _code(code: object) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value  # type: ignore[attr-defined]
    item.CodingSchemeDesignator = code.scheme_designator  # type: ignore[attr-defined]
    item.CodeMeaning = code.meaning  # type: ignore[attr-defined]
    return item


def _patient_and_study(ds: Dataset, phantom: Phantom, acq: Acquisition) -> None:
    seed = phantom.seed
    person = demographics(seed)
    # Patient module
    ds.PatientName = f"PHANTOM^{seed:04d}"
    ds.PatientID = f"GVRPH{seed:06d}"
    ds.PatientBirthDate = acq.birth_date.strftime("%Y%m%d")
    ds.PatientSex = person.sex
    ds.PatientIdentityRemoved = "NO"
    # General Study and Patient Study modules
    ds.StudyInstanceUID = phantom_uid(seed, "study")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = acq.when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = acq.when.strftime("%H%M%S")
    ds.ReferringPhysicianName = "REFERRER^SYNTHETIC"
    ds.StudyID = f"S{seed % 10**15:d}"[:16]
    ds.AccessionNumber = f"GVRA{seed:08d}"[:16]
    ds.StudyDescription = "CHEST PA" if acq.view == "PA" else "CHEST AP"
    ds.PatientAge = f"{person.age:03d}Y"
    # General Series and DX Series modules
    ds.Modality = "DX"
    ds.SeriesInstanceUID = phantom_uid(seed, "series")
    ds.SeriesNumber = 1
    ds.SeriesDescription = f"Chest {acq.view} (synthetic phantom)"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "CHEST"
    # General Equipment module
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "training.phantoms"
    ds.SoftwareVersions = "1"
    ds.InstitutionName = "Synthetic"
    ds.StationName = "PHANTOM"


def _image(ds: Dataset, phantom: Phantom, acq: Acquisition) -> None:
    rows, columns = phantom.image.shape
    spacing = acq.field_of_view_mm / columns
    # General Image and DX Anatomy Imaged modules
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["L", "F"]
    ds.ImageLaterality = "U"
    ds.AnatomicRegionSequence = Sequence([_code(codes.SCT.Chest)])
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    # DX Positioning module
    ds.ViewPosition = acq.view
    ds.PositionerType = "NONE"
    view = codes.SCT.PosteroAnterior if acq.view == "PA" else codes.SCT.AnteroPosterior
    ds.ViewCodeSequence = Sequence([_code(view)])
    # DX Detector module
    ds.DetectorType = "DIRECT"
    ds.ImagerPixelSpacing = [f"{spacing:.6f}", f"{spacing:.6f}"]
    ds.PixelSpacing = [f"{spacing:.6f}", f"{spacing:.6f}"]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "synthetic phantom, magnification corrected"
    ds.DistanceSourceToDetector = "1800" if acq.view == "PA" else "1000"
    # Image Pixel and DX Image modules
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if acq.monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, BITS_STORED, BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if acq.monochrome1 else -1  # -1: higher value, less X-ray reached
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    ds.PresentationLUTShape = "INVERSE" if acq.monochrome1 else "IDENTITY"
    ds.PixelData = stored_pixels(phantom.image, acq.monochrome1).tobytes()
    # VOI LUT module
    ds.WindowCenter = str((MAX_VALUE + 1) // 2)
    ds.WindowWidth = str(MAX_VALUE + 1)
    ds.VOILUTFunction = "LINEAR"
    # Acquisition Context module (Type 2: present, empty)
    ds.AcquisitionContextSequence = Sequence([])


def phantom_dataset(phantom: Phantom, monochrome1: bool | None = None) -> Dataset:
    """The phantom as a DX For Presentation dataset with file meta, ready for ``save_as``.

    Parameters
    ----------
    phantom:
        From :func:`training.phantoms.make_phantom`.
    monochrome1:
        Force the photometric interpretation; ``None`` lets the seed decide
        (about a third MONOCHROME1, as from some vendors' detectors).
    """
    if not isinstance(phantom, Phantom):
        raise TypeError(f"phantom_dataset needs a training.phantoms.Phantom, got {type(phantom).__name__}")
    acq = Acquisition.for_seed(phantom.seed)
    if monochrome1 is not None:
        acq = Acquisition(
            monochrome1=monochrome1,
            view=acq.view,
            field_of_view_mm=acq.field_of_view_mm,
            when=acq.when,
            birth_date=acq.birth_date,
        )
    ds = Dataset()
    # SOP Common module
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = phantom_uid(phantom.seed, "instance")
    ds.InstanceCreationDate = acq.when.strftime("%Y%m%d")
    ds.InstanceCreationTime = acq.when.strftime("%H%M%S")
    _patient_and_study(ds, phantom, acq)
    _image(ds, phantom, acq)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def save_dicom(phantom: Phantom, path: Path) -> None:
    """Write the phantom's dataset (seed-decided photometric interpretation) as a DICOM file."""
    dataset = phantom_dataset(phantom)
    write_atomic(path, lambda target: dataset.save_as(target, enforce_file_format=True))


def save_twin_dicom(twin: Phantom, path: Path) -> None:
    """Write a healthy twin as DICOM: same patient, but a study, series and instance of its own.

    The twin must never pass for the phantom itself (same SOP Instance UID) in a PACS or a spool.
    """
    dataset = phantom_dataset(twin)
    for attribute, role in (("StudyInstanceUID", "twin-study"), ("SeriesInstanceUID", "twin-series"),
                            ("SOPInstanceUID", "twin-instance")):
        setattr(dataset, attribute, phantom_uid(twin.seed, role))
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    write_atomic(path, lambda target: dataset.save_as(target, enforce_file_format=True))


def save_png(array: np.ndarray, path: Path) -> None:
    """An 8-bit greyscale PNG of a [0, 1] image, or 0/255 for a boolean mask."""
    if array.dtype == np.bool_:
        pixels = array.astype(np.uint8) * 255
    else:
        pixels = np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    write_atomic(path, lambda target: Image.fromarray(pixels, mode="L").save(target, format="PNG"))


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary name and rename, so a reader never sees half a file."""
    partial = path.with_name(f".{path.name}.partial")
    write(partial)
    os.replace(partial, path)


def to_model_image(ds: Dataset) -> np.ndarray:
    """Back from stored values to the phantom's [0, 1] MONOCHROME2 image (what a reader must undo)."""
    values = ds.pixel_array.astype(np.float32) / MAX_VALUE
    return 1.0 - values if ds.PhotometricInterpretation == "MONOCHROME1" else values
