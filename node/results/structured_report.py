"""The machine-readable result: a TID 1500 Measurement Report in a Comprehensive 3D SR.

One measurement group per source image. An image like the training data gets
the finding type (heart failure) and its presence coded from CID 240
"Present-Absent" (a negative result is a negative finding: heart failure
*Absent*), the probability (and the estimated BNP when the model gives one) as
measurements, the out-of-distribution flag = No. An image flagged out of
distribution gets no finding at all: "not analysed: out of distribution", the
flag = Yes and the out-of-distribution score, and no probability a reader could
threshold into one. Every group names the algorithm and references the source. The
device observer is the algorithm; Contributing Equipment names the model
(IHE AI Results). The Secondary Captures appear in the report's image
library and in its evidence, so a viewer can jump from the numbers to the
pictures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from node.artefacts import ImageResult, ModelInfo
from node.results import uids
from node.results.secondary_capture import (
    AlgorithmEquipment,
    ResultIdentity,
    copy_patient_and_study,
    set_series_date,
    source_orientation,
)
from node.results.source_header import SourceHeader
from node.selection import RESULT_MANUFACTURER

log = logging.getLogger(__name__)
# Our own coding scheme (PS3.16 allows local schemes prefixed "99") for concepts no standard names.
LOCAL_SCHEME = "99GVR"
ANALYSIS = Code("ANALYSIS", LOCAL_SCHEME, "Analysis")
NOT_ANALYSED_OOD = Code("NOT-ANALYSED-OOD", LOCAL_SCHEME, "Not analysed: out of distribution")
OUT_OF_DISTRIBUTION = Code("OOD", LOCAL_SCHEME, "Image out of the model's training distribution")
OOD_SCORE = Code("OOD-SCORE", LOCAL_SCHEME, "Reconstruction error (out-of-distribution score)")
PROBABILITY_HEALTHY = Code("P-HEALTHY", LOCAL_SCHEME, "Model probability after removal of the rationale")
HEART_FAILURE = codes.SCT.HeartFailure
PRESENT, ABSENT = codes.SCT.Present, codes.SCT.Absent  # CID 240 "Present-Absent"
PROBABILITY = codes.DCM.Probability
BNP = Code("42637-9", "LN", "Natriuretic peptide B [Mass/volume] in Serum or Plasma")
NANOGRAMS_PER_LITRE = Code("ng/L", "UCUM", "nanogram per liter")
PROCEDURE = codes.SCT.PlainRadiography


@dataclass(frozen=True)
class ReportInputs:
    """What the report says about one source image, checked before any DICOM is built."""

    source: SourceHeader  # the source's cleaned attributes (``source_header``)
    image: ImageResult
    model: ModelInfo
    pictures: tuple[Dataset, ...]  # the SCs made from the same source, referenced by the report
    report_ood: bool = False  # setting report_ood_findings: an OOD image keeps its (flagged) finding

    @property
    def withholds_finding(self) -> bool:
        return self.image.ood_flag and not self.report_ood

    def __post_init__(self) -> None:
        if self.source.sop_instance_uid != self.image.source_sop_instance_uid:
            raise ValueError(
                f"source dataset {self.source.sop_instance_uid} is not the image the result describes "
                f"({self.image.source_sop_instance_uid})"
            )
        for picture in self.pictures:
            if picture.StudyInstanceUID != self.source.dataset.StudyInstanceUID:
                raise ValueError(f"SC {picture.SOPInstanceUID} lies in another study than its source")


_EVIDENCE_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality",
                      "Rows", "Columns", "SpecificCharacterSet")  # fmt: skip
_TYPE2_READ_BY_HIGHDICOM = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate",
                            "StudyTime", "ReferringPhysicianName", "AccessionNumber")  # fmt: skip


def _evidence_source(header: SourceHeader) -> Dataset:
    """What highdicom reads of the source: its identity and geometry, and no patient data.

    highdicom validates (and logs, value included) the patient attributes of the
    first evidence; we hand it empty ones and copy the cleaned originals after.
    """
    evidence = Dataset()
    for keyword in _EVIDENCE_KEYWORDS:
        if keyword in header.dataset:
            evidence[keyword] = header.dataset[keyword]
    for keyword in _TYPE2_READ_BY_HIGHDICOM:
        setattr(evidence, keyword, "")
    orientation, spacing = source_orientation(header.dataset), _imager_spacing(header.dataset)
    if orientation is not None and spacing is not None:
        evidence.PatientOrientation, evidence.ImagerPixelSpacing = list(orientation), list(spacing)
    return evidence


def _imager_spacing(source: Dataset) -> tuple[float, float] | None:
    value = source.get("ImagerPixelSpacing")
    try:
        spacing = (float(value[0]), float(value[1])) if value is not None and len(value) == 2 else None
    except (TypeError, ValueError):
        return None
    return spacing if spacing is not None and min(spacing) > 0 else None


def _library_entries(evidence: Dataset) -> list[Dataset]:
    """The source for the image library; left out when it lacks what the library describes.

    highdicom's library entry for a projection radiograph reads PatientOrientation
    and ImagerPixelSpacing (Type 1 and 1C in DX, yet CR and processed images often
    lack them); the source stays the measurement group's Source of Measurement and
    the SR's evidence either way.
    """
    if "PatientOrientation" not in evidence or "ImagerPixelSpacing" not in evidence:
        log.info("source %s lacks a valid PatientOrientation or ImagerPixelSpacing: not in the SR's image "
                 "library", evidence.SOPInstanceUID)  # fmt: skip
        return []
    return [evidence]


def _measurements(image: ImageResult, withhold: bool) -> list[hd.sr.Measurement]:
    unitless = codes.UCUM.NoUnits
    ood = hd.sr.Measurement(name=OOD_SCORE, value=round(image.ood_score, 6), unit=unitless)
    if withhold:
        return [ood]  # no probability: a reader could threshold it into the finding we do not make
    measurements = [
        hd.sr.Measurement(name=PROBABILITY, value=round(image.probability, 6), unit=unitless),
        hd.sr.Measurement(name=PROBABILITY_HEALTHY, value=round(image.probability_healthy, 6), unit=unitless),
        ood,
    ]
    if image.estimated_bnp is not None:
        measurements.append(
            hd.sr.Measurement(
                name=BNP,
                value=round(image.estimated_bnp, 3),
                unit=NANOGRAMS_PER_LITRE,
                method=codes.SCT.Estimated,
            )
        )
    return measurements


def _evaluations(image: ImageResult, withhold: bool) -> list[hd.sr.QualitativeEvaluation]:
    if withhold:
        return [
            hd.sr.QualitativeEvaluation(name=ANALYSIS, value=NOT_ANALYSED_OOD),
            hd.sr.QualitativeEvaluation(name=OUT_OF_DISTRIBUTION, value=codes.SCT.Yes),
        ]
    return [
        hd.sr.QualitativeEvaluation(name=HEART_FAILURE, value=PRESENT if image.positive else ABSENT),
        hd.sr.QualitativeEvaluation(name=OUT_OF_DISTRIBUTION, value=codes.SCT.Yes if image.ood_flag else codes.SCT.No),
    ]


def _group(inputs: ReportInputs, evidence: Dataset) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    model, image = inputs.model, inputs.image
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.tracking_uid(image.source_sop_instance_uid, model.version),
            identifier="GVR heart failure",
        ),
        finding_type=None if inputs.withholds_finding else HEART_FAILURE,
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=model.name,
            version=model.version,
            parameters=[f"threshold={model.threshold:g}", f"bnp_threshold_ng_per_l={model.bnp_threshold:g}"],
            manufacturer=RESULT_MANUFACTURER,
        ),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(evidence)],
        measurements=_measurements(image, inputs.withholds_finding),
        qualitative_evaluations=_evaluations(image, inputs.withholds_finding),
    )


def _observation_context(model: ModelInfo) -> hd.sr.ObservationContext:
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.device_uid(model.name, model.version),
            name=f"{model.name} {model.version}"[:64],
            manufacturer_name=RESULT_MANUFACTURER,
            model_name=model.name[:64],
        ),
    )
    return hd.sr.ObservationContext(observer_device_context=device)


def build_report(inputs: ReportInputs, identity: ResultIdentity) -> Dataset:
    """The Comprehensive 3D SR for one source image, in the source's study."""
    evidence = _evidence_source(inputs.source)
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(inputs.model),
        procedure_reported=PROCEDURE,
        imaging_measurements=[_group(inputs, evidence)],
        referenced_images=[*_library_entries(evidence), *inputs.pictures],
    )
    equipment = AlgorithmEquipment(inputs.model.name, inputs.model.version)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[evidence, *inputs.pictures],
        content=report[0],
        series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=identity.instance_number,
        manufacturer=RESULT_MANUFACTURER,
        is_complete=True,
        contributing_equipment=[equipment.contributing()],
    )
    copy_patient_and_study(inputs.source.dataset, sr)
    # General Series and General Equipment modules
    sr.SeriesDescription = identity.series_description
    set_series_date(sr)
    sr.ManufacturerModelName = inputs.model.name[:64]
    sr.SoftwareVersions = inputs.model.version[:64]
    return _with_local_scheme(sr)


def _with_local_scheme(sr: Dataset) -> Dataset:
    """Declare our "99GVR" coding scheme (SOP Common module), so readers know whose codes they are."""
    item = Dataset()
    item.CodingSchemeDesignator = LOCAL_SCHEME
    item.CodingSchemeName = "gvr-node local codes"
    item.CodingSchemeResponsibleOrganization = RESULT_MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [item]
    return sr
