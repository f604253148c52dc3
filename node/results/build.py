"""From a job's artefacts to DICOM files in the spool outbox, ready for C-STORE.

``build_results`` reads ``result.json`` and the arrays the inference worker
left (``node.artefacts``) and returns, per source image, the overlay SC, then,
when the overlay shows a rationale (a positive prediction on an image like the
training data), the side-by-side SC (original | the source minus the rationale)
and the cine SC (when a cine exists), and last the SR: pictures before the
report that references them. A negative gets its grey overlay, which says why
there is no rationale, and the SR: no picture of disease removed from an image
the model does not call diseased. ``write_outbox`` writes them atomically and
durably, then a manifest last: its presence means the outbox is complete.
UIDs are deterministic (``uids``), so building twice gives the same objects.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom import Dataset
from pydicom.errors import InvalidDicomError

from node.artefacts import ImageResult, JobResult, load_array, read_job_result
from node.results import overlay, uids
from node.results.outbox_file import make_folder, write_dataset_file
from node.results.secondary_capture import (
    AlgorithmEquipment,
    ResultIdentity,
    cine_sc,
    overlay_sc,
    side_by_side_sc,
)
from node.results.source_header import SourceRepair, clean_source_header, quiet_pydicom
from node.results.structured_report import ReportInputs, build_report
from node.results.uids import ObjectKind, SeriesKind
from node.spool import Spool, fsync_folder, uid_to_filename

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
_SAFE_JOB_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")
# series kind -> (Series Number, Series Description); high numbers sort after the acquired series
SERIES: dict[SeriesKind, tuple[int, str]] = {
    SeriesKind.RATIONALE: (9001, "GVR rationale"),
    SeriesKind.CINE: (9002, "GVR rationale cine"),
    SeriesKind.REPORT: (9003, "GVR report"),
}


class ResultBuildError(ValueError):
    """The job's artefacts or source image cannot make result objects (retrying will not help)."""


@dataclass(frozen=True)
class BuiltJob:
    """A job's result objects in sending order, and what had to be repaired in its sources to make them."""

    datasets: list[Dataset]
    repairs: tuple[SourceRepair, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class OutboxEntry:
    """One built object as the manifest lists it."""

    file: str
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    source_sop_instance_uid: str


def _identity(
    study_uid: str, source_uid: str, version: str, kind: ObjectKind, series: SeriesKind, number: int
) -> ResultIdentity:
    series_number, description = SERIES[series]
    return ResultIdentity(
        series_instance_uid=uids.series_uid(study_uid, version, series),
        series_number=series_number,
        series_description=description,
        sop_instance_uid=uids.instance_uid(source_uid, version, kind),
        instance_number=number,
    )


def _read_source(image: ImageResult) -> Dataset:
    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(image.source_path)
    except (OSError, InvalidDicomError) as error:
        raise ResultBuildError(
            f"cannot read source {image.source_path} of image {image.key} ({type(error).__name__})"
        ) from error
    if str(ds.get("SOPInstanceUID", "")) != image.source_sop_instance_uid:
        raise ResultBuildError(
            f"{image.source_path} holds SOP instance {ds.get('SOPInstanceUID')}, "
            f"not {image.source_sop_instance_uid} named in the job result"
        )
    return ds


def _optional_array(results_root: Path, job_id: str, key: str, name: str) -> np.ndarray | None:
    try:
        return load_array(results_root, job_id, key, name)
    except FileNotFoundError:
        return None


def build_for_image(result: JobResult, index: int, results_root: Path, report_ood: bool = False) -> BuiltJob:
    """The result objects of the ``index``-th image (0-based) of a job, pictures first.

    ``report_ood`` (setting ``report_ood_findings``) gives an out-of-distribution
    image its thresholded finding anyway, still flagged, still without colour.
    """
    image, model = result.images[index], result.model
    source = _read_source(image)
    base = overlay.display_image(source)
    header = clean_source_header(source)
    caption = overlay.Caption.for_image(model, image)
    if report_ood and image.ood_flag:
        caption = replace(caption, finding="heart failure likely" if image.positive else "heart failure unlikely")
    equipment = AlgorithmEquipment(model.name, model.version)
    study, version, number = str(source.StudyInstanceUID), model.version, result.first_number + index

    def identity(kind: ObjectKind, series: SeriesKind, instance_number: int) -> ResultIdentity:
        return _identity(study, image.source_sop_instance_uid, version, kind, series, instance_number)

    rationale = _optional_array(results_root, result.job_id, image.key, "rationale")
    if rationale is None:
        raise ResultBuildError(
            f"job {result.job_id} image {image.key} has no rationale.npy: nothing to overlay"
        )
    rationale = rationale.astype(np.float32, copy=False)  # stored as float32: no full-size copy
    grey = overlay.to_grey(base)  # converted once for both pictures
    pictures = [overlay_sc(header, overlay.render_overlay(grey, rationale, caption),
                           identity(ObjectKind.OVERLAY, SeriesKind.RATIONALE, 2 * number - 1), equipment)]  # fmt: skip
    if caption.shows_rationale:
        pixels = overlay.render_side_by_side(grey, overlay.healthy_grey(base, rationale), caption)
        pictures.append(side_by_side_sc(header, pixels, identity(ObjectKind.SIDE_BY_SIDE, SeriesKind.RATIONALE,
                                                                  2 * number), equipment))  # fmt: skip
        cine = _optional_array(results_root, result.job_id, image.key, "cine")
        if cine is not None:
            frames = overlay.render_cine(cine.astype(np.float32, copy=False), caption)
            pictures.append(cine_sc(header, frames, identity(ObjectKind.CINE, SeriesKind.CINE, number), equipment))
    report = build_report(ReportInputs(header, image, model, tuple(pictures), report_ood),
                          identity(ObjectKind.REPORT, SeriesKind.REPORT, number))  # fmt: skip
    return BuiltJob([*pictures, report], header.repairs)


def build_job(results_root: Path, job_id: str, report_ood: bool = False) -> BuiltJob:
    """Every result object of a job and the source repairs they needed. Raises ResultBuildError, FileNotFoundError."""
    result = read_job_result(results_root, job_id)
    datasets: list[Dataset] = []
    repairs: list[SourceRepair] = []
    for index in range(len(result.images)):
        built = build_for_image(result, index, results_root, report_ood)
        datasets.extend(built.datasets)
        repairs.extend(built.repairs)
    log.info("job %s: built %d result objects", job_id, len(datasets))
    if repairs:
        log.warning("job %s: %d source attribute(s) not copied verbatim: %s", job_id, len(repairs),
                    ", ".join(f"{r.keyword} {r.action}" for r in repairs))  # fmt: skip
    return BuiltJob(datasets, tuple(repairs))


def build_results(results_root: Path, job_id: str) -> list[Dataset]:
    """Every result object of a job, in sending order. Raises ResultBuildError, FileNotFoundError."""
    return build_job(results_root, job_id).datasets


def _kind_of(ds: Dataset) -> str:
    sop_class = str(ds.SOPClassUID)
    if sop_class.startswith("1.2.840.10008.5.1.4.1.1.88."):
        return ObjectKind.REPORT.value
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return ObjectKind.CINE.value
    return (
        ObjectKind.OVERLAY.value if ds.PhotometricInterpretation == "RGB" else ObjectKind.SIDE_BY_SIDE.value
    )


def _source_of(ds: Dataset) -> str:
    if "SourceImageSequence" in ds:
        return str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
    evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    return str(evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


def encode(ds: Dataset) -> bytes:
    """The dataset as a DICOM file (preamble, file meta) in bytes."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def outbox_folder(spool: Spool, job_id: str) -> Path:
    """``<spool>/outbox/<job_id>``; a job id that could escape the folder is refused."""
    if not _SAFE_JOB_ID.match(job_id):
        raise ValueError(f"job id {job_id!r} is not a safe folder name (letters, digits, '.', '_', '-')")
    return spool.outbox / job_id


def write_outbox(spool: Spool, job_id: str, datasets: list[Dataset]) -> list[OutboxEntry]:
    """Write each object as ``outbox/<job>/<SOPInstanceUID>.dcm``, then ``manifest.json`` last."""
    folder = outbox_folder(spool, job_id)
    make_folder(folder)
    entries = []
    for ds in datasets:
        name = f"{uid_to_filename(str(ds.SOPInstanceUID))}.dcm"
        write_dataset_file(spool, ds, folder / name)  # pydicom writes into the file: no copy in memory
        entries.append(OutboxEntry(name, _kind_of(ds), str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                   str(ds.file_meta.TransferSyntaxUID), _source_of(ds)))  # fmt: skip
    fsync_folder(folder)  # every object's name is durable before the manifest says the outbox is complete
    manifest = {"job_id": job_id, "objects": [entry.__dict__ for entry in entries]}
    spool.store(json.dumps(manifest, indent=2).encode(), folder / MANIFEST, replace=True)
    return entries


def read_outbox(spool: Spool, job_id: str) -> list[OutboxEntry] | None:
    """The manifest's entries when the outbox is complete (manifest and every file present), else None."""
    folder = outbox_folder(spool, job_id)
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    entries = [OutboxEntry(**item) for item in data["objects"]]
    if not all((folder / entry.file).is_file() for entry in entries):
        return None
    return entries


def outbox_path(spool: Spool, job_id: str, entry: OutboxEntry) -> Path:
    return outbox_folder(spool, job_id) / entry.file


def prepare_outbox(
    spool: Spool,
    job_id: str,
    on_repairs: Callable[[tuple[SourceRepair, ...]], None] | None = None,
    report_ood: bool = False,
) -> list[OutboxEntry]:
    """The job's outbox, built from its artefacts unless a complete one is already there.

    ``on_repairs`` hears the source repairs of a fresh build (for the audit trail).
    """
    entries = read_outbox(spool, job_id)
    if entries is None:
        built = build_job(spool.results, job_id, report_ood)
        entries = write_outbox(spool, job_id, built.datasets)
        if built.repairs and on_repairs is not None:
            on_repairs(built.repairs)
    return entries


def write_previews(spool: Spool, job_id: str, folder: Path) -> list[Path]:
    """PNGs of a job's SCs from its outbox (the cine's first and last frames), for people and the demo.

    Named ``<image key>-<kind>.png``; returns the paths written. Raises
    FileNotFoundError when the job has no complete outbox.
    """
    entries = read_outbox(spool, job_id)
    if entries is None:
        raise FileNotFoundError(f"job {job_id} has no complete outbox in {spool.outbox}: deliver it first")
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for entry in entries:
        if entry.kind == ObjectKind.REPORT.value:
            continue
        pixels = pydicom.dcmread(outbox_path(spool, job_id, entry)).pixel_array
        cine = entry.kind == ObjectKind.CINE.value
        frames = {"-first": pixels[0], "-last": pixels[-1]} if cine else {"": pixels}
        for suffix, frame in frames.items():
            path = folder / f"{uid_to_filename(entry.source_sop_instance_uid)}-{entry.kind}{suffix}.png"
            Image.fromarray(np.asarray(frame, dtype=np.uint8)).save(path)
            written.append(path)
    return written
