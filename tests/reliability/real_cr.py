"""Computed Radiography objects the way processed or archived CR reaches a PACS (issue 9's first finding).

Real CR from an archive or a processing station differs from our DX phantoms in
ways that broke naive code: CR Image Storage with ImageType ``DERIVED\\PRIMARY``
(sometimes ``\\POST_PROCESSED``), MONOCHROME1, 12 bits stored in 16, no
ImagerPixelSpacing (optional for CR) and PixelSpacing alone, absent or ``0\\0``,
dates written ``1970-01-01``, and pixels in JPEG 2000, lossless or lossy with
Lossy Image Compression ``01``, its ratio and method ``ISO_15444_1``.
The anatomy is a phantom's; every header is a real CR's (CR Series, CR Image,
General Equipment with a plate ID and exposure values), and the JPEG 2000
codestreams come from OpenJPEG through pydicom (pylibjpeg-openjpeg).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from training.phantoms import make_phantom

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
BITS_STORED = 12
LOSSY_RATIO = 10.0  # what we ask OpenJPEG for; the header carries the ratio measured on the result


@dataclass(frozen=True)
class CRVariant:
    """One way real CR departs from the textbook; ``change`` edits the base object, ``syntax`` encodes it."""

    name: str
    change: Callable[[Dataset], None]
    syntax: str = ExplicitVRLittleEndian


def _nothing(ds: Dataset) -> None:
    """The base object as it is: DERIVED\\PRIMARY, MONOCHROME1, PixelSpacing only, 12 bits in 16."""


def _no_spacing(ds: Dataset) -> None:
    del ds.PixelSpacing


def _spacing_zero(ds: Dataset) -> None:
    ds.PixelSpacing = ["0", "0"]


def _dashed_dates(ds: Dataset) -> None:
    for keyword in ("PatientBirthDate", "StudyDate", "SeriesDate", "ContentDate", "AcquisitionDate"):
        value = str(ds[keyword].value)
        ds[keyword].value = f"{value[:4]}-{value[4:6]}-{value[6:]}"


def _post_processed(ds: Dataset) -> None:
    ds.ImageType = ["DERIVED", "PRIMARY", "POST_PROCESSED"]


def _monochrome2(ds: Dataset) -> None:
    pixels = ds.pixel_array
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = ((1 << BITS_STORED) - 1 - pixels).astype(np.uint16).tobytes()


VARIANTS: tuple[CRVariant, ...] = (
    CRVariant("j2k-lossless", _nothing, JPEG2000Lossless),
    CRVariant("j2k-lossy", _nothing, JPEG2000),
    CRVariant("no-pixel-spacing", _no_spacing, JPEG2000Lossless),
    CRVariant("pixel-spacing-zero", _spacing_zero),
    CRVariant("dashed-dates", _dashed_dates, JPEG2000Lossless),
    CRVariant("post-processed", _post_processed),
    CRVariant("monochrome2-uncompressed", _monochrome2),
)


def real_cr(seed: int, size: int = 512, patient: tuple[str, str] = ("DOE^JANE", "CR0001")) -> Dataset:
    """The base CR: a phantom chest as CR Image Storage, uncompressed, with a processed CR's header."""
    phantom = make_phantom(seed, size)
    stored = np.rint((1.0 - np.clip(phantom.image, 0.0, 1.0)) * ((1 << BITS_STORED) - 1)).astype(np.uint16)
    ds = Dataset()
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CR_STORAGE
    ds.SOPInstanceUID = generate_uid()
    # Patient; General Study
    ds.PatientName, ds.PatientID = patient
    ds.PatientBirthDate, ds.PatientSex = "19500412", "F"
    ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = generate_uid(), "4711", f"A{seed:07d}"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = "20240305"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101530"
    ds.ReferringPhysicianName, ds.StudyDescription = "", "THORAX PA"
    # General Series; CR Series (BodyPartExamined and ViewPosition are Type 2)
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "CR", generate_uid(), "1"
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.PlateType, ds.PhosphorType = "ST-VI", "BaFBr:Eu"
    # General Equipment
    ds.Manufacturer, ds.ManufacturerModelName, ds.StationName = "CR VENDOR", "CR READER 5000", "CR01"
    ds.SoftwareVersions = "V2.1"
    # General Image; CR Image
    ds.InstanceNumber = "1"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.PatientOrientation = ["L", "F"]
    ds.KVP, ds.ExposureTime, ds.XRayTubeCurrent = "125", "8", "320"
    ds.PlateID, ds.RelativeXRayExposure, ds.Sensitivity = "P0042", "1850", "200"
    ds.PixelSpacing = ["0.175", "0.175"]  # calibrated at the detector, no ImagerPixelSpacing
    ds.AcquisitionDeviceProcessingDescription = "CHEST PA GRADATION"
    # Image Pixel; Modality and VOI LUT
    ds.Rows, ds.Columns, ds.SamplesPerPixel = size, size, 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, BITS_STORED, BITS_STORED - 1, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    ds.WindowCenter, ds.WindowWidth = "2048", "4096"
    ds.PixelData = stored.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def encode_as(ds: Dataset, syntax: str) -> None:
    """Compress in place; a lossy codestream gets Lossy Image Compression 01 with its real ratio and method."""
    if syntax == ExplicitVRLittleEndian:
        return
    raw_bytes = len(ds.PixelData)
    if syntax == JPEG2000:
        ds.compress(JPEG2000, j2k_cr=[LOSSY_RATIO], use_mct=False)
        codestream = sum(len(fragment) for fragment in _fragments(ds))
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = f"{raw_bytes / codestream:.2f}"
        ds.LossyImageCompressionMethod = "ISO_15444_1"
    else:
        ds.compress(syntax)


def _fragments(ds: Dataset) -> list[bytes]:
    from pydicom.encaps import generate_fragments

    return list(generate_fragments(ds.PixelData))


def write_variant(variant: CRVariant, folder: Path, seed: int, size: int = 512,
                  patient: tuple[str, str] = ("DOE^JANE", "CR0001")) -> tuple[Dataset, Path]:  # fmt: skip
    """The variant as a file named after it; returns the dataset as written and the path."""
    ds = real_cr(seed, size, patient)
    variant.change(ds)
    encode_as(ds, variant.syntax)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{variant.name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return ds, path
