"""The machine-readable result: a TID 1500 Measurement Report in a Comprehensive 3D SR.

One measurement group per source image: the finding type (heart failure),
a coded "likely / unlikely" evaluation, the probability (and the estimated
BNP when the model gives one) as measurements, the out-of-distribution flag,
the algorithm's name and version, and a reference to the source image. The
device observer is the algorithm; Contributing Equipment names the model
(IHE AI Results). The Secondary Captures appear in the report's image
library and in its evidence, so a viewer can jump from the numbers to the
pictures.
"""

from __future__ import annotations

import copy
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
)
from node.selection import RESULT_MANUFACTURER

log = logging.getLogger(__name__)
# Our own coding scheme (PS3.16 allows local schemes prefixed "99") for concepts no standard names.
LOCAL_SCHEME = "99GVR"
HEART_FAILURE_LIKELY = Code("HF-LIKELY", LOCAL_SCHEME, "Heart failure likely")
HEART_FAILURE_UNLIKELY = Code("HF-UNLIKELY", LOCAL_SCHEME, "Heart failure unlikely")
OUT_OF_DISTRIBUTION = Code("OOD", LOCAL_SCHEME, "Image out of the model's training distribution")
OOD_SCORE = Code("OOD-SCORE", LOCAL_SCHEME, "Reconstruction error (out-of-distribution score)")
PROBABILITY_HEALTHY = Code("P-HEALTHY", LOCAL_SCHEME, "Model probability after removal of the rationale")
HEART_FAILURE = codes.SCT.HeartFailure
PROBABILITY = codes.DCM.Probability
BNP = Code("42637-9", "LN", "Natriuretic peptide B [Mass/volume] in Serum or Plasma")
NANOGRAMS_PER_LITRE = Code("ng/L", "UCUM", "nanogram per liter")
PROCEDURE = codes.SCT.PlainRadiography


@dataclass(frozen=True)
class ReportInputs:
    """What the report says about one source image, checked before any DICOM is built."""

    source: Dataset
    image: ImageResult
    model: ModelInfo
    pictures: tuple[Dataset, ...]  # the SCs made from the same source, referenced by the report

    def __post_init__(self) -> None:
        if str(self.source.get("SOPInstanceUID", "")) != self.image.source_sop_instance_uid:
            raise ValueError(
                f"source dataset {self.source.get('SOPInstanceUID')} is not the image the result describes "
                f"({self.image.source_sop_instance_uid})"
            )
        for picture in self.pictures:
            if picture.StudyInstanceUID != self.source.StudyInstanceUID:
                raise ValueError(f"SC {picture.SOPInstanceUID} lies in another study than its source")


def _evidence_source(source: Dataset) -> Dataset:
    """The source's header with the Type 2 attributes highdicom reads directly made present."""
    header = Dataset()
    for element in source:
        if element.tag != 0x7FE00010:  # no pixels needed to reference an image
            header.add(copy.deepcopy(element))
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate",
                    "StudyTime", "ReferringPhysicianName", "AccessionNumber"):  # fmt: skip
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def _library_entries(source: Dataset) -> list[Dataset]:
    """The source for the image library; left out when it lacks what the library describes.

    highdicom's library entry for a projection radiograph reads PatientOrientation
    (Type 1 in DX/CR, yet some senders omit it); the source stays the measurement
    group's Source of Measurement and the SR's evidence either way.
    """
    if "PatientOrientation" not in source or len(source.PatientOrientation) != 2:
        log.info("source %s has no PatientOrientation: not in the SR's image library", source.SOPInstanceUID)
        return []
    return [source]


def _measurements(image: ImageResult) -> list[hd.sr.Measurement]:
    unitless = codes.UCUM.NoUnits
    measurements = [
        hd.sr.Measurement(name=PROBABILITY, value=round(image.probability, 6), unit=unitless),
        hd.sr.Measurement(name=PROBABILITY_HEALTHY, value=round(image.probability_healthy, 6), unit=unitless),
        hd.sr.Measurement(name=OOD_SCORE, value=round(image.ood_score, 6), unit=unitless),
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


def _evaluations(image: ImageResult) -> list[hd.sr.QualitativeEvaluation]:
    return [
        hd.sr.QualitativeEvaluation(
            name=HEART_FAILURE, value=HEART_FAILURE_LIKELY if image.positive else HEART_FAILURE_UNLIKELY
        ),
        hd.sr.QualitativeEvaluation(
            name=OUT_OF_DISTRIBUTION, value=codes.SCT.Yes if image.ood_flag else codes.SCT.No
        ),
    ]


def _group(inputs: ReportInputs, source: Dataset) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    model, image = inputs.model, inputs.image
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.tracking_uid(image.source_sop_instance_uid, model.version),
            identifier="GVR heart failure",
        ),
        finding_type=HEART_FAILURE,
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=model.name,
            version=model.version,
            parameters=[f"threshold={model.threshold:g}", f"bnp_threshold_ng_per_l={model.bnp_threshold:g}"],
            manufacturer=RESULT_MANUFACTURER,
        ),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        measurements=_measurements(image),
        qualitative_evaluations=_evaluations(image),
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
    source = _evidence_source(inputs.source)
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(inputs.model),
        procedure_reported=PROCEDURE,
        imaging_measurements=[_group(inputs, source)],
        referenced_images=[*_library_entries(source), *inputs.pictures],
    )
    equipment = AlgorithmEquipment(inputs.model.name, inputs.model.version)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source, *inputs.pictures],
        content=report[0],
        series_instance_uid=identity.series_instance_uid,
        series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid,
        instance_number=identity.instance_number,
        manufacturer=RESULT_MANUFACTURER,
        is_complete=True,
        contributing_equipment=[equipment.contributing()],
    )
    copy_patient_and_study(inputs.source, sr)
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
