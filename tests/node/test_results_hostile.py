"""Result objects from sources as real PACS send them: missing attributes, malformed values, lossy pixels.

Each source is a phantom radiograph changed in one way and saved to disk, so the
builders read it back the way delivery does (raw elements, the sender's VRs).
Every object must build, pass dciodvfy with no errors, and the audit trail must
name each attribute that was repaired or dropped without quoting its value.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.uid import JPEG2000

from node.artefacts import ImageResult, JobResult, ModelInfo, write_job_result
from node.results.build import BuiltJob, build_job, encode, prepare_outbox
from node.results.source_header import clean_source_header
from node.spool import Spool
from tests.node.test_results import dciodvfy_errors
from tests.peers import require_tool
from training.phantom_dicom import phantom_dataset
from training.phantoms import make_phantom

MODEL = ModelInfo(name="gvr-test", version="0.0.1", threshold=0.5)
SIZE = 64
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def build_from(
    tmp_path: Path, change: Callable[[Dataset], None], probability: float = 0.8, ood: bool = False
) -> tuple[Dataset, BuiltJob]:
    """A phantom source changed by ``change``, saved, and a job result on it, built."""
    source, spool = write_job(tmp_path, change, probability, ood)
    return source, build_job(spool.results, "hostile")


def write_job(
    tmp_path: Path, change: Callable[[Dataset], None], probability: float = 0.8, ood: bool = False
) -> tuple[Dataset, Spool]:
    """A phantom source changed by ``change``, saved, and a job result ``hostile`` on it."""
    source = phantom_dataset(make_phantom(11, SIZE))
    change(source)
    path = tmp_path / "source.dcm"
    source.save_as(path, enforce_file_format=True)
    spool = Spool(tmp_path / "spool")
    key = str(source.SOPInstanceUID)
    image = ImageResult(key, key, str(path), probability, 0.1, probability >= 0.5, 5, 0.04, ood, 300.0)
    rationale = np.full((SIZE, SIZE), 0.2, np.float32)
    write_job_result(
        spool.results, JobResult("hostile", MODEL, "cpu", (image,)), {key: {"rationale": rationale}}
    )
    return source, spool


def assert_valid(tmp_path: Path, built: BuiltJob, allowed: tuple[str, ...] = ()) -> None:
    """Every object passes dciodvfy with no error (but the ``allowed`` attribute names)."""
    for number, ds in enumerate(built.datasets):
        path = tmp_path / f"object-{number}.dcm"
        path.write_bytes(encode(ds))
        errors = [e for e in dciodvfy_errors(path) if not any(name in e for name in allowed)]
        errors = [e for e in errors if not (allowed and "contains invalid data values" in e)]
        assert errors == [], f"{ds.SOPClassUID}: {errors}"


def drop(*keywords: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword in keywords:
            if keyword in ds:
                del ds[keyword]

    return change


def as_cr(ds: Dataset) -> None:
    """A CR as processed archives send it: no ImagerPixelSpacing, PixelSpacing 0\\0, DERIVED."""
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.Modality = "CR"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.PixelSpacing = ["0", "0"]
    for keyword in ("ImagerPixelSpacing", "PixelSpacing", "PresentationIntentType", "DetectorType",
                    "PixelSpacingCalibrationType", "PixelSpacingCalibrationDescription", "PositionerType"):  # fmt: skip
        if keyword in ds:
            del ds[keyword]


MISSING = {
    "ImagerPixelSpacing": drop("ImagerPixelSpacing"),
    "PatientOrientation": drop("PatientOrientation"),
    "Laterality": drop("ImageLaterality", "Laterality"),
    "everything optional": drop(
        "ImagerPixelSpacing",
        "PixelSpacing",
        "PatientOrientation",
        "ImageLaterality",
        "StudyDate",
        "StudyTime",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyID",
        "ReferringPhysicianName",
        "BodyPartExamined",
        "ViewPosition",
        "SpecificCharacterSet",
        "LossyImageCompression",
    ),
    "CR without ImagerPixelSpacing": as_cr,
}


@pytest.mark.parametrize("missing", list(MISSING))
def test_source_missing_optional_attributes_still_builds_valid_objects(tmp_path: Path, missing: str) -> None:
    """Each missing attribute: overlay, side-by-side and SR build, reference the source, pass dciodvfy."""
    source, built = build_from(tmp_path, MISSING[missing])
    assert [str(ds.SOPClassUID) for ds in built.datasets][-1] == SR_CLASS and len(built.datasets) == 3
    for ds in built.datasets:
        assert ds.PatientID == source.PatientID and ds.StudyInstanceUID == source.StudyInstanceUID
    if "PatientOrientation" not in source:
        assert built.datasets[0].PatientOrientation in ("", None)  # unknown is not guessed
    assert_valid(tmp_path, built)


def raw(keyword_tag: int, vr: str, value: object) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        ds[keyword_tag] = DataElement(keyword_tag, vr, value)

    return change


def several(*changes: Callable[[Dataset], None]) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for one in changes:
            one(ds)

    return change


# name -> (change, {keyword: (action, value in the results or None when dropped/empty)}, the bad text)
MALFORMED: dict[str, tuple[Callable[[Dataset], None], dict[str, tuple[str, str | None]], str]] = {
    "dashed birth date": (raw(0x00100030, "DA", "1970-01-01"), {"PatientBirthDate": ("repaired", "19700101")},
                          "1970-01-01"),
    "slashed date, colon time": (several(raw(0x00080020, "DA", "2021/03/04"), raw(0x00080030, "TM", "10:11:12")),
                                 {"StudyDate": ("repaired", "20210304"), "StudyTime": ("repaired", "101112")},
                                 "2021/03/04"),
    "impossible date": (raw(0x00080020, "DA", "20211345"), {"StudyDate": ("dropped", None)}, "20211345"),
    "sex spelled out": (raw(0x00100040, "CS", "Male"), {"PatientSex": ("repaired", "M")}, "Male"),
    "age in words": (raw(0x00101010, "AS", "70 years"), {"PatientAge": ("dropped", None)}, "70 years"),
    "over-long description": (raw(0x00081030, "LO", "CHEST " * 20), {"StudyDescription": ("repaired", None)},
                              "CHEST " * 20),
    "over-long accession": (raw(0x00080050, "SH", "ACC" * 10), {"AccessionNumber": ("dropped", None)}, "ACC" * 10),
    "birth date under the wrong VR": (raw(0x00100030, "LO", "1970-01-01"),
                                      {"PatientBirthDate": ("repaired", "19700101")}, "1970-01-01"),
    "body part in lower case": (raw(0x00180015, "CS", "chest"), {"BodyPartExamined": ("repaired", "CHEST")},
                                "chest"),
    "escape in a description": (raw(0x00081030, "LO", "CHEST\x1b[31mRED"),
                                {"StudyDescription": ("repaired", "CHEST[31mRED")}, "\x1b"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_values_repaired_or_dropped_with_audit_and_no_value(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A malformed copied value never fails the build: repaired or dropped, each named without its value."""
    change, expected, bad = MALFORMED[case]
    _, spool = write_job(tmp_path, change)  # pydicom warns here, writing the bad value: not our log
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    built = build_job(spool.results, "hostile")
    actions = {repair.keyword: repair.action for repair in built.repairs}
    for keyword, (action, value) in expected.items():
        assert actions.get(keyword) == action, built.repairs
        for ds in (
            built.datasets[:-1] if keyword == "BodyPartExamined" else built.datasets
        ):  # not an SR attribute
            if value is not None:
                assert str(ds[keyword].value) == value
            elif action == "dropped":
                assert keyword not in ds or ds[keyword].value in ("", None)
        if keyword == "StudyDescription":
            assert all(len(str(ds.StudyDescription)) <= 64 for ds in built.datasets)
    for repair in built.repairs:
        assert bad.strip() not in str(repair.as_dict()), repair  # the audit trail never quotes the value
    assert bad.strip() not in caplog.text  # nor the log
    assert_valid(tmp_path, built)


def test_overlong_patient_id_is_kept_verbatim(tmp_path: Path) -> None:
    """PatientID files the result with the patient: never cut (a prefix may be another patient), reported as kept."""
    patient_id = "P" * 70
    _, built = build_from(tmp_path, raw(0x00100020, "LO", patient_id))
    assert all(ds.PatientID == patient_id for ds in built.datasets)
    assert [(r.keyword, r.action) for r in built.repairs] == [("PatientID", "kept")]
    assert_valid(tmp_path, built, allowed=("Patient ID",))


def test_clean_header_keeps_valid_values_verbatim() -> None:
    """A clean phantom needs no repair: every copied value is the source's own."""
    source = phantom_dataset(make_phantom(4, SIZE))
    header = clean_source_header(source)
    assert header.repairs == ()
    for keyword in ("PatientName", "PatientBirthDate", "StudyDate", "AccessionNumber", "ImagerPixelSpacing"):
        assert header.dataset[keyword].value == source[keyword].value
    assert "PixelData" not in header.dataset


def lossy_j2k(ds: Dataset) -> None:
    ds.compress(JPEG2000, j2k_cr=[20])
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = "20"
    ds.LossyImageCompressionMethod = "ISO_15444_1"


def unlabelled_j2k(ds: Dataset) -> None:
    ds.compress(JPEG2000, j2k_cr=[20])
    del ds.LossyImageCompression


@pytest.mark.parametrize(
    ("change", "ratio", "method"),
    [(lossy_j2k, "20", "ISO_15444_1"), (unlabelled_j2k, None, "ISO_15444_1")],
    ids=["labelled lossy J2K", "unlabelled J2K"],
)
def test_lossy_source_makes_lossy_scs(
    tmp_path: Path, change: Callable[[Dataset], None], ratio: str | None, method: str
) -> None:
    """A lossy JPEG 2000 source: every SC says LossyImageCompression 01 with the ratio and method."""
    pytest.importorskip("openjpeg", reason="pip install pylibjpeg-openjpeg")
    _, built = build_from(tmp_path, change)
    for sc in built.datasets[:-1]:
        assert sc.LossyImageCompression == "01"
        assert sc.LossyImageCompressionMethod == method
        if ratio is not None:
            assert str(sc.LossyImageCompressionRatio) == ratio
        else:
            assert float(sc.LossyImageCompressionRatio) > 1.0  # computed from the pixel data size
    assert_valid(tmp_path, built)


def test_lossless_source_makes_lossless_scs(tmp_path: Path) -> None:
    """An uncompressed source saying 00: the SCs say 00, with no ratio or method."""
    _, built = build_from(tmp_path, lambda ds: None)
    for sc in built.datasets[:-1]:
        assert sc.LossyImageCompression == "00" and "LossyImageCompressionRatio" not in sc


def test_out_of_distribution_sr_has_no_finding(tmp_path: Path) -> None:
    """OOD: no finding, no probability; "not analysed: out of distribution" with the OOD score; dciodvfy clean."""
    tool = require_tool("dsrdump", "dcmtk")
    _, built = build_from(tmp_path, lambda ds: None, probability=0.9, ood=True)
    assert len(built.datasets) == 2  # the grey overlay and the SR: no rationale pictures
    path = tmp_path / "sr.dcm"
    path.write_bytes(encode(built.datasets[-1]))
    text = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60, check=True).stdout
    assert '"Not analysed: out of distribution"' in text
    assert '"Reconstruction error (out-of-distribution score)")="0.04"' in text
    assert '(373066001,SCT,"Yes")' in text
    for absent in ('"Finding"', "Heart failure", '"Probability"', "Natriuretic", "Present", "Absent"):
        assert absent not in text, absent
    assert_valid(tmp_path, built)


def test_prepare_outbox_reports_repairs_once(tmp_path: Path) -> None:
    """The repairs of a fresh build reach the callback; reusing the complete outbox reports nothing."""
    source = phantom_dataset(make_phantom(12, SIZE))
    source[0x00100030] = DataElement(0x00100030, "DA", "1970-01-01")
    path = tmp_path / "source.dcm"
    source.save_as(path, enforce_file_format=True)
    spool = Spool(tmp_path / "spool")
    key = str(source.SOPInstanceUID)
    image = ImageResult(key, key, str(path), 0.2, 0.1, False, 5, 0.04, False)
    rationale = np.zeros((SIZE, SIZE), np.float32)
    write_job_result(
        spool.results, JobResult("job-r", MODEL, "cpu", (image,)), {key: {"rationale": rationale}}
    )
    heard: list[tuple[str, str]] = []
    prepare_outbox(spool, "job-r", lambda repairs: heard.extend((r.keyword, r.action) for r in repairs))
    prepare_outbox(spool, "job-r", lambda repairs: heard.extend((r.keyword, r.action) for r in repairs))
    assert heard == [("PatientBirthDate", "repaired")]


def test_report_ood_findings_setting_keeps_the_flagged_finding(tmp_path: Path) -> None:
    """report_ood_findings (default off): the OOD image keeps its finding and probability, flagged Yes."""
    from node.config import Settings

    assert Settings().report_ood_findings is False
    tool = require_tool("dsrdump", "dcmtk")
    _, spool = write_job(tmp_path, lambda ds: None, probability=0.9, ood=True)
    built = build_job(spool.results, "hostile", report_ood=True)
    path = tmp_path / "sr.dcm"
    path.write_bytes(encode(built.datasets[-1]))
    text = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60, check=True).stdout
    assert 'CODE:(,,"Heart failure")=(52101004,SCT,"Present")' in text and '"Probability")="0.9"' in text
    assert '(373066001,SCT,"Yes")' in text and "Not analysed" not in text
    assert_valid(tmp_path, built)
