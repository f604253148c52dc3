"""Result objects: SCs and the SR built from a fake job result on a phantom source.

The job result is written with ``node.artefacts.write_job_result`` from a
phantom DX image and synthetic arrays (a strong rationale blob over the heart),
so these tests never need the inference worker.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import Dataset, config
from pydicom.uid import UID

from node.artefacts import (
    DEFAULT_RATIONALE_SCALE,
    ImageResult,
    JobResult,
    ModelInfo,
    read_job_result,
    write_job_result,
)
from node.results import uids
from node.results.build import ResultBuildError, build_results, encode, prepare_outbox, read_outbox
from node.results.overlay import (
    NO_RATIONALE_NEGATIVE,
    Caption,
    cine_label,
    display_image,
    healthy_image,
    render_overlay,
)
from node.selection import RESULT_MANUFACTURER, RESULT_SERIES_PREFIX, SelectionRule
from node.spool import Spool
from tests.peers import require_tool
from training.phantom_dicom import phantom_dataset
from training.phantoms import make_phantom

MODEL = ModelInfo(name="gvr-test", version="0.0.1", threshold=0.5)
BLOB = (0.55, 0.55, 0.08)  # centre row, centre column (fractions) and radius of the strong rationale


@dataclass(frozen=True)
class FakeJob:
    spool: Spool
    job_id: str
    source: Dataset
    source_path: Path
    result: JobResult


def blob_mask(size: int) -> np.ndarray:
    rows, columns = np.mgrid[0:size, 0:size] / size
    return np.asarray((rows - BLOB[0]) ** 2 + (columns - BLOB[1]) ** 2 < BLOB[2] ** 2)


def make_fake_job(
    root: Path, job_id: str = "job-0001", seed: int = 5, size: int = 256, arrays: tuple[str, ...] = (
        "rationale", "cine"), probability: float = 0.83, bnp: float | None = 420.0, model: ModelInfo = MODEL,
) -> FakeJob:  # fmt: skip
    """A spool holding a phantom source and a complete job result with synthetic arrays."""
    spool = Spool(root / "spool")
    source = phantom_dataset(make_phantom(seed, size))
    source_path = root / f"source-{seed}.dcm"
    source.save_as(source_path, enforce_file_format=True)
    rng = np.random.default_rng(seed)
    rationale = np.where(blob_mask(size), 0.3, 0.0).astype(np.float32)
    rationale += rng.normal(0.0, 0.002, rationale.shape).astype(np.float32)  # under the tint floor
    base = display_image(source)
    available = {
        "rationale": rationale,
        "reconstruction": base,
        "cine": np.stack([base[::4, ::4] * (1 - k / 10) for k in range(6)]).astype(np.float32),
    }
    image = ImageResult(
        key=str(source.SOPInstanceUID), source_sop_instance_uid=str(source.SOPInstanceUID),
        source_path=str(source_path), probability=probability, probability_healthy=0.08,
        positive=probability >= model.threshold, steps=120, ood_score=0.03, ood_flag=False, estimated_bnp=bnp,
    )  # fmt: skip
    result = JobResult(job_id=job_id, model=model, device="cpu", images=(image,), seconds=1.5)
    write_job_result(spool.results, result, {image.key: {name: available[name] for name in arrays}})
    return FakeJob(spool, job_id, source, source_path, result)


@pytest.fixture
def fake_job(tmp_path: Path) -> FakeJob:
    return make_fake_job(tmp_path)


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy prints for ``path``."""
    tool = require_tool("dciodvfy", "dicom3tools")
    out = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60, check=False)
    return [line for line in (out.stderr + out.stdout).splitlines() if line.startswith("Error")]


def test_uids_deterministic_and_distinct() -> None:
    """The same (source, version, kind) gives the same UID under 2.25; any change gives another."""
    first = uids.instance_uid("1.2.3.4", "1.0", uids.ObjectKind.OVERLAY)
    assert first == uids.instance_uid("1.2.3.4", "1.0", "overlay-sc")
    assert first.startswith("2.25.") and len(first) <= 64
    others = {
        uids.instance_uid("1.2.3.5", "1.0", uids.ObjectKind.OVERLAY),
        uids.instance_uid("1.2.3.4", "1.1", uids.ObjectKind.OVERLAY),
        uids.instance_uid("1.2.3.4", "1.0", uids.ObjectKind.REPORT),
        uids.series_uid("1.2.3.4", "1.0", uids.SeriesKind.RATIONALE),
    }
    assert first not in others and len(others) == 4
    with pytest.raises(ValueError, match="not a valid"):
        uids.instance_uid("1.2.3.4", "1.0", "thumbnail")


def test_build_results_objects_in_order_and_same_study(fake_job: FakeJob) -> None:
    """Overlay, side-by-side, cine SCs then the SR, all in the source's study with our labels."""
    datasets = build_results(fake_job.spool.results, fake_job.job_id)
    assert [str(ds.SOPClassUID) for ds in datasets] == [
        "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.7.2", "1.2.840.10008.5.1.4.1.1.88.34",
    ]  # fmt: skip
    source = fake_job.source
    for ds in datasets:
        for keyword in ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "AccessionNumber",
                        "StudyID", "StudyDate"):  # fmt: skip
            assert ds[keyword].value == source[keyword].value, keyword
        assert ds.Manufacturer == RESULT_MANUFACTURER
        assert ds.SeriesDescription.startswith(RESULT_SERIES_PREFIX)
        equipment = ds.ContributingEquipmentSequence
        assert any(item.ManufacturerModelName == MODEL.name and item.SoftwareVersions == MODEL.version
                   for item in equipment)  # fmt: skip
        assert SelectionRule().reason_to_skip(ds) is not None  # the loop guard never analyses our output
    for sc in datasets[:3]:
        assert sc.BurnedInAnnotation == "YES"
        assert list(sc.PatientOrientation) == list(source.PatientOrientation)
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert datasets[0].PhotometricInterpretation == "RGB"
    assert (datasets[0].Rows, datasets[0].Columns) >= (source.Rows, source.Columns)
    assert int(datasets[2].NumberOfFrames) == 6


def test_build_results_pass_dciodvfy(fake_job: FakeJob, tmp_path: Path) -> None:
    """Every object (overlay, side-by-side, cine, SR) passes dciodvfy with no errors."""
    for number, ds in enumerate(build_results(fake_job.spool.results, fake_job.job_id)):
        path = tmp_path / f"object-{number}.dcm"
        path.write_bytes(encode(ds))
        assert dciodvfy_errors(path) == [], f"{ds.SOPClassUID} ({ds.SeriesDescription})"


def test_build_results_round_trip_strict(fake_job: FakeJob) -> None:
    """Each object saved to bytes reads back with pydicom strict, pixels and UIDs unchanged."""
    datasets = build_results(fake_job.spool.results, fake_job.job_id)
    previous = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE
    try:
        for ds in datasets:
            back = pydicom.dcmread(BytesIO(encode(ds)))
            assert back.SOPInstanceUID == ds.SOPInstanceUID
            assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"  # uncompressed: any viewer
            if "PixelData" in ds:
                np.testing.assert_array_equal(back.pixel_array, ds.pixel_array)
    finally:
        config.settings.reading_validation_mode = previous


def test_build_results_twice_same_uids(fake_job: FakeJob) -> None:
    """Building again (a retry) gives the very same SOP instance and series UIDs."""
    first = build_results(fake_job.spool.results, fake_job.job_id)
    second = build_results(fake_job.spool.results, fake_job.job_id)
    assert [(d.SOPInstanceUID, d.SeriesInstanceUID) for d in first] == [
        (d.SOPInstanceUID, d.SeriesInstanceUID) for d in second
    ]
    assert len({d.SOPInstanceUID for d in first}) == len(first)


def test_overlay_coloured_where_rationale_strong(fake_job: FakeJob, tmp_path: Path) -> None:
    """The overlay is red/yellow inside the rationale blob and grey far from it (PNG kept for review)."""
    sc = build_results(fake_job.spool.results, fake_job.job_id)[0]
    pixels = sc.pixel_array.astype(int)
    Image.fromarray(sc.pixel_array).save(tmp_path / "overlay.png")
    size = int(fake_job.source.Rows)
    inside = pixels[:size, :size][blob_mask(size)]
    assert np.mean(inside[:, 0] - inside[:, 2]) > 80  # red over blue: tinted
    far = pixels[5:40, 5:40]
    assert np.abs(far[..., 0] - far[..., 2]).max() <= 2  # untouched greyscale


def test_caption_lines_carry_disclaimer_and_numbers() -> None:
    """The burned-in caption says NOT FOR DIAGNOSTIC USE, the finding, p, threshold, the scale and the model."""
    image = ImageResult("k", "1.2.3", "/x.dcm", 0.83, 0.1, True, 10, 0.02, False, None)
    text = "\n".join(Caption.for_image(MODEL, image).lines())
    for expected in ("NOT FOR DIAGNOSTIC USE", "heart failure likely", "p = 0.83", "threshold 0.50",
                     "gvr-test 0.0.1", "model probability after removal: 0.10", "+/-0.10",
                     "same scale for every patient"):  # fmt: skip
        assert expected in text
    assert "p healthy" not in text and "healthy =" not in text  # never reads as a probability of health


def test_caption_out_of_distribution_gives_no_finding_and_no_rationale() -> None:
    """An image unlike the training data: no finding, no rationale, and the warning."""
    image = ImageResult("k", "1.2.3", "/x.dcm", 0.83, 0.1, True, 10, 0.02, True, None)
    caption = Caption.for_image(MODEL, image)
    text = "\n".join(caption.lines())
    assert not caption.shows_rationale and "heart failure likely" not in text
    for expected in ("no finding", "no rationale: image unlike the training data", "out of distribution"):
        assert expected in text


def test_render_overlay_grid_mismatch_raises() -> None:
    """A rationale not on the source grid is refused with both shapes named."""
    caption = Caption("heart failure likely", 0.9, 0.5, "m", "1")
    with pytest.raises(ValueError, match=r"\(8, 8\).*\(16, 16\)"):
        render_overlay(np.zeros((16, 16), np.float32), np.zeros((8, 8), np.float32), caption)


def test_sr_dsrdump_shows_finding_and_probability(fake_job: FakeJob, tmp_path: Path) -> None:
    """dcmtk's dsrdump reads the SR: heart failure present (CID 240), the probability, BNP, the algorithm."""
    tool = require_tool("dsrdump", "dcmtk")
    sr = build_results(fake_job.spool.results, fake_job.job_id)[-1]
    path = tmp_path / "sr.dcm"
    path.write_bytes(encode(sr))
    text = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60, check=True).stdout
    for expected in ('CODE:(,,"Heart failure")=(52101004,SCT,"Present")', '(84114007,SCT,"Heart failure")', '"Probability")="0.83"',
                     '"Natriuretic peptide B', '"Algorithm Version")="0.0.1"', '(373067005,SCT,"No")',
                     "Manufacturer        : gvr-node"):  # fmt: skip
        assert expected in text, expected


def test_sr_negative_is_an_absent_finding_without_bnp(tmp_path: Path) -> None:
    """A negative result is the finding heart failure coded Absent (CID 240), with no BNP measurement."""
    tool = require_tool("dsrdump", "dcmtk")
    job = make_fake_job(tmp_path, probability=0.2, bnp=None)
    path = tmp_path / "sr.dcm"
    path.write_bytes(encode(build_results(job.spool.results, job.job_id)[-1]))
    text = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60, check=True).stdout
    assert 'CODE:(,,"Heart failure")=(272519000,SCT,"Absent")' in text
    assert "Present" not in text and "likely" not in text and "Natriuretic" not in text
    assert dciodvfy_errors(path) == []


def test_build_results_without_optional_arrays(tmp_path: Path) -> None:
    """Without a cine array: the overlay, the side-by-side (made from the source and the rationale), the SR."""
    job = make_fake_job(tmp_path, arrays=("rationale",))
    kinds = [str(ds.SOPClassUID) for ds in build_results(job.spool.results, job.job_id)]
    assert kinds == ["1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.34"]


def test_build_results_without_rationale_raises(tmp_path: Path) -> None:
    """No rationale array: a ResultBuildError naming the job and the missing file."""
    job = make_fake_job(tmp_path, arrays=("cine",))
    with pytest.raises(ResultBuildError, match="job-0001.*rationale.npy"):
        build_results(job.spool.results, job.job_id)


def test_prepare_outbox_writes_once_then_reuses(fake_job: FakeJob) -> None:
    """The outbox is built, listed by its manifest, and reused (not rebuilt) on the next call."""
    entries = prepare_outbox(fake_job.spool, fake_job.job_id)
    assert [e.kind for e in entries] == ["overlay-sc", "side-by-side-sc", "cine-sc", "report-sr"]
    folder = fake_job.spool.outbox / fake_job.job_id
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert prepare_outbox(fake_job.spool, fake_job.job_id) == entries
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    assert read_outbox(fake_job.spool, fake_job.job_id) == entries
    assert not list(fake_job.spool.tmp.iterdir())  # no partial write left behind


def test_results_and_delivery_never_import_torch() -> None:
    """node.results, node.delivery and gvr resend import without torch or inference."""
    code = ("import sys, node.results.build, node.delivery, node.cli.resend; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('inference')]; "
            "sys.exit(f'imported {bad}' if bad else 0)")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_build_results_minimal_source_still_valid(tmp_path: Path) -> None:
    """A bare-bones source (no dates, birth date, orientation): our objects still pass dciodvfy."""
    from pydicom.uid import generate_uid

    from tests.factories import make_image

    source = make_image(generate_uid(), size=64)
    path = tmp_path / "bare.dcm"
    source.save_as(path, enforce_file_format=True)
    spool = Spool(tmp_path / "spool")
    key = str(source.SOPInstanceUID)
    image = ImageResult(key, key, str(path), 0.4, 0.1, False, 5, 0.01, True)
    zeros = np.zeros((64, 64), np.float32)
    write_job_result(spool.results, JobResult("bare", MODEL, "cpu", (image,)), {key: {"rationale": zeros}})
    datasets = build_results(spool.results, "bare")
    for number, ds in enumerate(datasets):
        assert ds.PatientID == source.PatientID and ds.StudyInstanceUID == source.StudyInstanceUID
        out = tmp_path / f"object-{number}.dcm"
        out.write_bytes(encode(ds))
        assert dciodvfy_errors(out) == [], str(ds.SOPClassUID)


def test_display_image_monochrome1_matches_monochrome2() -> None:
    """The same phantom stored MONOCHROME1 or MONOCHROME2 displays the same (bright = dense)."""
    phantom = make_phantom(7, 128)
    mono1 = display_image(phantom_dataset(phantom, monochrome1=True))
    mono2 = display_image(phantom_dataset(phantom, monochrome1=False))
    assert np.abs(mono1 - mono2).max() < 1e-3
    assert float(np.corrcoef(mono2.ravel(), phantom.image.ravel())[0, 1]) > 0.99


def test_build_results_two_images_one_series_each_kind(tmp_path: Path) -> None:
    """Two images of one study: 8 objects, distinct UIDs, one series per kind, numbered in order."""
    job = make_fake_job(tmp_path, arrays=("rationale",))
    second = job.source.copy()
    second.SOPInstanceUID = second.file_meta.MediaStorageSOPInstanceUID = UID("1.2.826.0.1.3680043.8.498.77")
    second_path = tmp_path / "second.dcm"
    second.save_as(second_path, enforce_file_format=True)
    first_image = job.result.images[0]
    image = ImageResult(
        key="second", source_sop_instance_uid=str(second.SOPInstanceUID), source_path=str(second_path),
        probability=0.3, probability_healthy=0.1, positive=False, steps=50, ood_score=0.02, ood_flag=False,
    )  # fmt: skip
    result = JobResult(job.job_id, MODEL, "cpu", (first_image, image))
    rationale = np.zeros((256, 256), np.float32)
    write_job_result(job.spool.results, result, {"second": {"rationale": rationale}})
    datasets = build_results(job.spool.results, job.job_id)
    assert len(datasets) == 5  # overlay, side-by-side, SR; overlay, SR
    assert len({ds.SOPInstanceUID for ds in datasets}) == 5
    series = {(ds.SeriesDescription, ds.SeriesInstanceUID) for ds in datasets}
    assert {name for name, _ in series} == {"GVR rationale", "GVR report"} and len(series) == 2
    assert [int(ds.InstanceNumber) for ds in datasets] == [1, 2, 1, 3, 2]


def test_write_previews_pngs_of_each_picture(fake_job: FakeJob, tmp_path: Path) -> None:
    """Previews: overlay, side-by-side and the cine's first and last frames, as PNG files."""
    from node.results.build import write_previews

    prepare_outbox(fake_job.spool, fake_job.job_id)
    paths = write_previews(fake_job.spool, fake_job.job_id, tmp_path / "previews")
    assert sorted(p.name.split("-", 1)[1] for p in paths) == [
        "cine-sc-first.png", "cine-sc-last.png", "overlay-sc.png", "side-by-side-sc.png"]  # fmt: skip
    assert Image.open(paths[0]).mode == "RGB"


def test_negative_gets_grey_overlay_and_no_rationale_pictures(tmp_path: Path) -> None:
    """Below threshold: the overlay is the grey radiograph (no colour, no colour bar), then the SR only."""
    job = make_fake_job(tmp_path, probability=0.2)
    datasets = build_results(job.spool.results, job.job_id)
    assert [str(ds.SOPClassUID) for ds in datasets] == ["1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.88.34"]
    pixels = datasets[0].pixel_array.astype(int)
    size = int(job.source.Rows)
    picture_and_bar = pixels[:size]
    assert np.abs(picture_and_bar[..., 0] - picture_and_bar[..., 2]).max() == 0  # no colour anywhere
    assert np.abs(picture_and_bar[..., 1] - picture_and_bar[..., 2]).max() == 0
    grey = np.rint(np.clip(display_image(job.source), 0, 1) * 255).astype(int)
    np.testing.assert_array_equal(pixels[:size, :size, 0], grey)  # the radiograph untouched
    caption = Caption.for_image(MODEL, job.result.images[0])
    assert NO_RATIONALE_NEGATIVE in caption.lines() and not caption.shows_rationale


def test_colour_scale_is_the_bundles_for_every_image(tmp_path: Path) -> None:
    """The overlay's scale comes from ModelInfo (the bundle), not from the image: a wider scale tints less."""
    default = make_fake_job(tmp_path / "default")
    wide = make_fake_job(tmp_path / "wide", model=ModelInfo("gvr-test", "0.0.1", 0.5, rationale_scale=0.6))
    assert read_job_result(wide.spool.results, wide.job_id).model.rationale_scale == 0.6
    size = int(default.source.Rows)
    tints = []
    for job in (default, wide):
        pixels = build_results(job.spool.results, job.job_id)[0].pixel_array.astype(int)
        inside = pixels[:size, :size][blob_mask(size)]
        tints.append(float(np.mean(inside[:, 0] - inside[:, 2])))
    assert tints[0] > tints[1] + 30  # 0.3 saturates a 0.10 scale, is half of a 0.6 one
    base = display_image(default.source)
    caption = Caption("heart failure likely", 0.9, 0.5, "m", "1", rationale_scale=0.2)
    strong = np.where(blob_mask(size), 0.2, 0.0).astype(np.float32)
    weak = render_overlay(base, strong / 4, caption)[:size, :size][blob_mask(size)].astype(int)
    full = render_overlay(base, strong, caption)[:size, :size][blob_mask(size)].astype(int)
    assert np.mean(full[:, 0] - full[:, 2]) > np.mean(weak[:, 0] - weak[:, 2]) + 30  # no per-image stretch


def test_model_info_without_scale_falls_back_to_the_documented_constant() -> None:
    """An older bundle with no fixed scale: DEFAULT_RATIONALE_SCALE, and a bad scale is refused."""
    assert MODEL.rationale_scale is None and MODEL.colour_scale == DEFAULT_RATIONALE_SCALE == 0.10
    assert Caption.for_image(MODEL, make_image_result()).rationale_scale == DEFAULT_RATIONALE_SCALE
    with pytest.raises(ValueError, match="rationale scale"):
        ModelInfo("m", "1", 0.5, rationale_scale=0.0)


def make_image_result(probability: float = 0.83) -> ImageResult:
    return ImageResult("k", "1.2.3", "/x.dcm", probability, 0.1, probability >= 0.5, 10, 0.02, False, None)


def test_healthy_image_equals_source_outside_the_upsampled_rationale(tmp_path: Path) -> None:
    """Healthy = source - upsample(rationale): the source pixel for pixel wherever the upsampled map is 0."""
    from inference.preprocess import dicom_to_model_image

    job = make_fake_job(tmp_path, size=200)
    base = display_image(job.source)
    _, geometry = dicom_to_model_image(job.source, 64)
    model_map = np.zeros((64, 64), np.float32)
    model_map[30:40, 26:38] = 0.4  # model space: G(z0) - G(z*)
    rationale = geometry.to_original(model_map / 2.0)
    healthy = healthy_image(base, rationale)
    outside = rationale == 0
    assert 0.2 < outside.mean() < 0.99
    np.testing.assert_array_equal(healthy[outside], base[outside])
    np.testing.assert_allclose(healthy[~outside], np.clip(base - rationale, 0, 1)[~outside], atol=1e-7)
    assert healthy.shape == base.shape and healthy.dtype == np.float32


def test_side_by_side_shows_source_and_source_minus_rationale(fake_job: FakeJob) -> None:
    """The side-by-side's right panel is the source minus the rationale at the source's resolution."""
    from node.artefacts import load_array

    sc = build_results(fake_job.spool.results, fake_job.job_id)[1]
    base = display_image(fake_job.source)
    rationale = load_array(fake_job.spool.results, fake_job.job_id, fake_job.result.images[0].key, "rationale")
    rows, columns = base.shape
    pixels = sc.pixel_array
    original = np.rint(base * 255).astype(np.uint8)
    top = next(y for y in range(pixels.shape[0] - rows + 1) if np.array_equal(pixels[y:y + rows, :columns], original))
    right = pixels[top:top + rows, pixels.shape[1] - columns:]
    np.testing.assert_array_equal(right, np.rint(np.clip(base - rationale, 0, 1) * 255).astype(np.uint8))
    assert not np.array_equal(right, original)  # the disease was removed somewhere


def test_cine_labels_say_model_decoding() -> None:
    """The cine's frames are decodings: the first says it is not the original."""
    assert cine_label(0, 6) == "model decoding (not the original)"
    assert all("model decoding" in cine_label(i, 6) for i in range(6))
    assert "original" not in cine_label(5, 6)


def test_late_job_numbers_its_objects_after_the_earlier_job(tmp_path: Path) -> None:
    """first_number 3 (two images analysed in an earlier job of the study): the same series, numbers 5, 6, 3, 3."""
    from dataclasses import replace

    from node.artefacts import read_job_result

    fake = make_fake_job(tmp_path)
    late = replace(fake.result, first_number=3)
    write_job_result(fake.spool.results, late, {})
    assert read_job_result(fake.spool.results, fake.job_id).first_number == 3
    first = build_results(fake.spool.results, fake.job_id)
    replace_back = replace(fake.result, first_number=1)
    write_job_result(fake.spool.results, replace_back, {})
    earlier = build_results(fake.spool.results, fake.job_id)
    assert [int(ds.InstanceNumber) for ds in first] == [5, 6, 3, 3]
    assert [int(ds.InstanceNumber) for ds in earlier] == [1, 2, 1, 1]
    assert [ds.SeriesInstanceUID for ds in first] == [ds.SeriesInstanceUID for ds in earlier]


def test_blend_tables_match_the_float_formula_within_two_grey_levels() -> None:
    """The integer blend (256-entry tint tables) draws what (1 - a) * grey + a * colour(t) says, +-2 of 255."""
    from node.results.overlay import blend, diverging_colours, overlay_alpha

    rng = np.random.default_rng(0)
    base = rng.random((64, 64), dtype=np.float32)
    scale = 0.3
    rationale = rng.uniform(-1.5 * scale, 1.5 * scale, (64, 64)).astype(np.float32)
    alpha = overlay_alpha(rationale, scale)[..., None]
    expected = (1 - alpha) * base[..., None] + alpha * diverging_colours(rationale / scale)
    drawn = blend(base, rationale, scale)
    assert drawn.dtype == np.uint8 and drawn.shape == (64, 64, 3)
    assert np.abs(drawn.astype(int) - np.rint(expected * 255).astype(int)).max() <= 2
    quiet = np.abs(rationale) < 0.1 * scale  # under the tint floor: exactly the grey image
    assert np.array_equal(drawn[quiet], np.repeat(np.rint(base * 255).astype(np.uint8)[quiet][:, None], 3, axis=1))


def _display_reference(ds: Dataset) -> np.ndarray:
    """The display image by pydicom's LUT functions in float64 (what display_image computed before)."""
    from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds, index=0).astype(np.float64)
    low, high = values.min(), values.max()
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return 1.0 - scaled if ds.get("PhotometricInterpretation") == "MONOCHROME1" else scaled


@pytest.mark.parametrize("variant", ["plain", "window", "two windows", "rescaled", "monochrome1", "sigmoid"])
def test_display_image_fast_path_matches_pydicom(variant: str) -> None:
    """The float32 modality/VOI path equals pydicom's float64 one (to 1e-4) for each common header."""
    ds = phantom_dataset(make_phantom(3, 128))
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction", "RescaleSlope", "RescaleIntercept"):
        if keyword in ds:
            delattr(ds, keyword)
    if variant in ("window", "sigmoid", "rescaled", "monochrome1"):
        ds.WindowCenter, ds.WindowWidth = 1800, 2400
    if variant == "two windows":
        ds.WindowCenter, ds.WindowWidth = [1500, 2000], [1000, 3000]
    if variant == "rescaled":
        ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-100"
        ds.WindowCenter = 700
    if variant == "monochrome1":
        ds.PhotometricInterpretation = "MONOCHROME1"
    if variant == "sigmoid":
        ds.VOILUTFunction = "SIGMOID"
    fast = display_image(ds)
    assert fast.dtype == np.float32
    np.testing.assert_allclose(fast, _display_reference(ds), atol=1e-4)
