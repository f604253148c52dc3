"""Small DICOM objects built in memory for tests: frontal chest DX images and friends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def make_image(
    study_uid: str,
    *,
    modality: str = "DX",
    sop_class: str = DX_FOR_PRESENTATION,
    view: str | None = "PA",
    body_part: str | None = "CHEST",
    size: int = 64,
    seed: int = 0,
    patient_name: str = "TEST^PATIENT",
    patient_id: str = "TESTID01",
) -> Dataset:
    """A small, valid-enough single-frame image with fresh SOP/series UIDs."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.Modality = modality
    if view is not None:
        ds.ViewPosition = view
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed)
    ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    return ds


def write(ds: Dataset, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_study(folder: Path, count: int, **kwargs: object) -> tuple[str, list[Path]]:
    """``count`` images of one new study; returns (study UID, paths)."""
    study_uid = generate_uid()
    paths = [write(make_image(study_uid, seed=i, **kwargs), folder) for i in range(count)]  # type: ignore[arg-type]
    return study_uid, paths


def dataset_body(path: Path) -> bytes:
    """The bytes after the file meta: what travels in a C-STORE."""
    raw = path.read_bytes()
    meta_end = _file_meta_end(raw)
    return raw[meta_end:]


def _file_meta_end(raw: bytes) -> int:
    with pydicom.filebase.DicomBytesIO(raw) as handle:
        handle.seek(128 + 4)
        pydicom.filereader._read_file_meta_info(handle)
        return handle.tell()
