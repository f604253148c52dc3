"""Synthetic chest radiograph phantoms: determinism, sign masks, BNP mix, DICOM validity, CSV."""

from __future__ import annotations

import csv
import shutil
import subprocess
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from training.cli import phantoms as phantoms_cli
from training.phantom_dicom import DX_FOR_PRESENTATION, MAX_VALUE, phantom_dataset, to_model_image
from training.phantom_signs import BNP_THRESHOLD, BNP_WEIGHTS
from training.phantoms import SIGNS, Phantom, anatomy_masks, make_phantom, make_twin, write_phantoms

CSV_COLUMNS = [
    "path",
    "bnp",
    "label",
    "cardiomegaly",
    "effusion",
    "venous_diversion",
    "edema",
    "ctr",
    "effusion_right",
    "effusion_left",
    "mask_cardiomegaly",
    "mask_effusion",
    "mask_venous_diversion",
    "mask_edema",
    "twin",
]
SIZE = 128


def _first_seed(condition: object, limit: int = 400) -> int:
    """The first seed whose phantom (at 32 px, cheap) satisfies ``condition``."""
    for seed in range(limit):
        if condition(make_phantom(seed, 32)):  # type: ignore[operator]
            return seed
    raise AssertionError(f"no seed below {limit} satisfies the condition")


def _widest(mask: np.ndarray) -> int:
    """Widest horizontal extent of a mask, in pixels (first to last True pixel of the widest row)."""
    widths = [np.ptp(np.flatnonzero(row)) + 1 for row in mask if row.any()]
    return int(max(widths))


def _measured_ctr(heart: np.ndarray, lungs: np.ndarray) -> float:
    return _widest(heart) / _widest(lungs)


def test_make_phantom_deterministic_from_seed() -> None:
    """The same seed gives the same pixels, severities and BNP; another seed does not."""
    first, again, other = make_phantom(7, SIZE), make_phantom(7, SIZE), make_phantom(8, SIZE)
    np.testing.assert_array_equal(first.image, again.image)
    assert first.severities == again.severities and first.bnp == again.bnp and first.ctr == again.ctr
    for name in SIGNS:
        np.testing.assert_array_equal(first.masks[name], again.masks[name])
    assert not np.array_equal(first.image, other.image)


def test_make_phantom_contract_types_and_range() -> None:
    """Image float32 in [0, 1], bool masks of the image's shape, label = BNP >= 100."""
    phantom = make_phantom(3, 64)
    assert isinstance(phantom, Phantom) and phantom.seed == 3
    assert phantom.image.shape == (64, 64) and phantom.image.dtype == np.float32
    assert 0.0 <= phantom.image.min() and phantom.image.max() <= 1.0
    assert set(phantom.masks) == set(SIGNS) == set(phantom.severities)
    assert all(mask.dtype == np.bool_ and mask.shape == (64, 64) for mask in phantom.masks.values())
    assert phantom.label == (phantom.bnp >= 100.0)


def test_make_phantom_same_patient_at_any_size() -> None:
    """A 256-pixel phantom averaged down to 64 pixels matches the 64-pixel phantom of the same seed."""
    small, large = make_phantom(11, 64), make_phantom(11, 256)
    pooled = large.image.reshape(64, 4, 64, 4).mean(axis=(1, 3))
    assert np.abs(pooled - small.image).mean() < 0.03
    assert small.severities == large.severities and small.bnp == large.bnp


def test_make_phantom_mirrors_lungs_dark_mediastinum_bright() -> None:
    """MONOCHROME2 convention: the mid-lung is darker than the mediastinum and the outside air is darkest."""
    phantom = make_phantom(0, SIZE)
    masks = anatomy_masks(0, SIZE)
    assert phantom.image[masks["lungs"]].mean() < phantom.image[masks["heart"]].mean() - 0.2
    assert (
        phantom.image[:, :3].mean() < phantom.image[masks["lungs"]].mean()
        or phantom.image[0, :3].mean() < 0.2
    )


@pytest.mark.parametrize("size", [16, 32, 64, 128])
def test_make_phantom_masks_empty_exactly_when_severity_zero(size: int) -> None:
    """Over 60 phantoms, a sign's mask has pixels if and only if its severity is above 0."""
    for seed in range(60):
        phantom = make_phantom(seed, size)
        for name in SIGNS:
            assert phantom.masks[name].any() == (phantom.severities[name] > 0), (seed, size, name)


def test_cardiomegaly_mask_measures_larger_ctr_than_normal_heart() -> None:
    """The cardiothoracic ratio measured on the cardiomegaly mask exceeds a normal phantom's, and matches ``ctr``."""
    big = _first_seed(lambda p: p.severities["cardiomegaly"] > 0.6)
    normal = _first_seed(lambda p: p.severities["cardiomegaly"] == 0 and p.ctr < 0.46)
    enlarged, healthy = make_phantom(big, 256), make_phantom(normal, 256)
    big_ctr = _measured_ctr(anatomy_masks(big, 256)["heart"], anatomy_masks(big, 256)["lungs"])
    normal_ctr = _measured_ctr(anatomy_masks(normal, 256)["heart"], anatomy_masks(normal, 256)["lungs"])
    assert big_ctr > 0.5 > normal_ctr
    assert big_ctr > normal_ctr + 0.08
    assert abs(big_ctr - enlarged.ctr) < 0.03 and abs(normal_ctr - healthy.ctr) < 0.03


def test_effusion_mask_sits_at_costophrenic_angle() -> None:
    """Effusion pixels are in the lower lateral chest: below the lungs' mid-height, lateral of the heart."""
    seed = _first_seed(lambda p: p.severities["effusion"] > 0.3)
    phantom = make_phantom(seed, SIZE)
    fluid = phantom.masks["effusion"]
    lungs = anatomy_masks(seed, SIZE)["lungs"]
    lung_rows = np.flatnonzero(lungs.any(axis=1))
    lung_cols = np.flatnonzero(lungs.any(axis=0))
    rows, cols = np.nonzero(fluid)
    assert rows.mean() > lung_rows.min() + 0.6 * (lung_rows.max() - lung_rows.min())
    lateral = np.abs(cols - 0.5 * (lung_cols.min() + lung_cols.max())) / (
        0.5 * (lung_cols.max() - lung_cols.min())
    )
    assert np.median(lateral) > 0.6
    assert (fluid & lungs).sum() > 0.8 * fluid.sum()


def test_signs_have_visible_effect_in_the_image() -> None:
    """Effusion opacifies its mask: brighter there than the same pixels in the lungs of a phantom without it."""
    seed = _first_seed(lambda p: p.severities["effusion"] > 0.4)
    phantom = make_phantom(seed, SIZE)
    fluid = phantom.masks["effusion"]
    lungs = anatomy_masks(seed, SIZE)["lungs"] & ~fluid
    assert phantom.image[fluid].mean() > phantom.image[lungs].mean() + 0.1


def test_bnp_label_mix_over_200_phantoms() -> None:
    """Prevalence of BNP >= 100 over 200 phantoms is between 0.3 and 0.6, with positives and negatives of each kind."""
    phantoms = [make_phantom(seed, 16) for seed in range(200)]
    labels = np.array([p.label for p in phantoms])
    assert 0.3 <= labels.mean() <= 0.6
    with_signs = np.array([any(v > 0 for v in p.severities.values()) for p in phantoms])
    assert (~labels & with_signs).any(), "expected some negatives with a (mild) sign"
    assert all(p.bnp > 0 for p in phantoms)


def test_make_phantom_rejects_bad_arguments() -> None:
    """Negative seeds and tiny sizes are caller mistakes with a message naming the value."""
    with pytest.raises(ValueError, match="seed"):
        make_phantom(-1, 64)
    with pytest.raises(ValueError, match="size"):
        make_phantom(1, 8)


def test_phantom_dataset_roundtrip_keeps_pixels() -> None:
    """Saved and re-read strictly, the 12-bit pixels come back exactly and map back to the phantom image."""
    phantom = make_phantom(5, SIZE)
    dataset = phantom_dataset(phantom, monochrome1=False)
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    with pydicom.config.strict_reading():
        back = pydicom.dcmread(BytesIO(buffer.getvalue()))
    assert back.SOPClassUID == DX_FOR_PRESENTATION and back.Modality == "DX"
    assert back.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (back.BitsAllocated, back.BitsStored, back.HighBit, back.PixelRepresentation) == (16, 12, 11, 0)
    expected = np.rint(phantom.image * MAX_VALUE).astype(np.uint16)
    np.testing.assert_array_equal(back.pixel_array, expected)
    assert np.abs(to_model_image(back) - phantom.image).max() <= 0.5 / MAX_VALUE + 1e-6


def test_phantom_dataset_monochrome1_stores_inverted_values() -> None:
    """MONOCHROME1 stores 4095 minus the MONOCHROME2 value, so both display the same picture."""
    phantom = make_phantom(6, 64)
    mono1 = phantom_dataset(phantom, monochrome1=True)
    mono2 = phantom_dataset(phantom, monochrome1=False)
    assert mono1.PhotometricInterpretation == "MONOCHROME1" and mono1.PresentationLUTShape == "INVERSE"
    np.testing.assert_array_equal(mono1.pixel_array.astype(int), MAX_VALUE - mono2.pixel_array.astype(int))
    np.testing.assert_allclose(to_model_image(mono1), to_model_image(mono2), atol=1e-6)


def test_phantom_dataset_seed_decides_uids_and_photometric_mix() -> None:
    """UIDs are the same for the same seed and differ across seeds; the seeds mix MONOCHROME1/2 and PA/AP."""
    datasets = [phantom_dataset(make_phantom(seed, 16)) for seed in range(40)]
    again = phantom_dataset(make_phantom(0, 16))
    assert again.SOPInstanceUID == datasets[0].SOPInstanceUID and again.StudyInstanceUID.startswith("2.25.")
    assert (
        len({ds.StudyInstanceUID for ds in datasets}) == 40 == len({ds.SeriesInstanceUID for ds in datasets})
    )
    assert {ds.PhotometricInterpretation for ds in datasets} == {"MONOCHROME1", "MONOCHROME2"}
    assert {ds.ViewPosition for ds in datasets} == {"PA", "AP"}
    assert datasets[3].PatientName == "PHANTOM^0003"


def test_phantom_dicom_passes_dciodvfy_at_1024(tmp_path: Path) -> None:
    """A default-size phantom, MONOCHROME1 and MONOCHROME2, gives no Error lines from dciodvfy."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy not found: apt-get install dicom3tools")
    phantom = make_phantom(42)
    assert phantom.image.shape == (1024, 1024)
    for monochrome1 in (False, True):
        path = tmp_path / f"mono{int(monochrome1)}.dcm"
        phantom_dataset(phantom, monochrome1=monochrome1).save_as(path, enforce_file_format=True)
        result = subprocess.run([tool, str(path)], check=False, capture_output=True, text=True, timeout=60)
        report = result.stdout + result.stderr
        assert "DXImageForPresentation" in report
        assert not [line for line in report.splitlines() if line.startswith("Error")], report
        spacing = float(pydicom.dcmread(path).PixelSpacing[0])
        assert 0.14 <= spacing <= 0.4 and 340 <= spacing * 1024 <= 430


def test_write_phantoms_png_csv_columns_and_masks(tmp_path: Path) -> None:
    """labels.csv has the columns; images and masks exist at the CSV's relative paths; seeds follow seed + i."""
    csv_path = write_phantoms(6, 20, tmp_path / "set", "png", size=48)
    assert csv_path == tmp_path / "set" / "labels.csv"
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == 6
    for index, row in enumerate(rows):
        phantom = make_phantom(20 + index, 48)
        assert (csv_path.parent / row["path"]).is_file()
        assert row["label"] == str(int(phantom.label)) and abs(float(row["bnp"]) - phantom.bnp) < 0.01
        for name in SIGNS:
            assert bool(row[f"mask_{name}"]) == (phantom.severities[name] > 0)
            if row[f"mask_{name}"]:
                assert (csv_path.parent / row[f"mask_{name}"]).is_file()
    assert not list((tmp_path / "set").rglob("*.partial"))


def test_write_phantoms_dicom_files_read_back(tmp_path: Path) -> None:
    """The DICOM format writes .dcm files pydicom reads as DX."""
    csv_path = write_phantoms(2, 0, tmp_path, "dicom", size=64)
    with csv_path.open(newline="") as handle:
        paths = [row["path"] for row in csv.DictReader(handle)]
    assert all(path.endswith(".dcm") for path in paths)
    assert pydicom.dcmread(tmp_path / paths[0]).Modality == "DX"


def test_write_phantoms_rejects_unknown_format(tmp_path: Path) -> None:
    """An unknown format is a caller mistake."""
    with pytest.raises(ValueError, match="format"):
        write_phantoms(1, 0, tmp_path, "jpeg", size=32)  # type: ignore[arg-type]


def test_cli_phantoms_writes_csv_preview_and_reports_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """gvr phantoms writes the set and a preview grid, prints the CSV path; a bad --n exits 2 with a message."""
    preview = tmp_path / "preview.png"
    argv = ["--n", "2", "--seed", "3", "--out", str(tmp_path), "--format", "png", "--size", "32"]
    assert phantoms_cli.main([*argv, "--quiet", "--preview", str(preview)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "labels.csv")
    with Image.open(preview) as image:
        assert image.mode == "RGB" and image.width == 2 * 256
    assert phantoms_cli.main(["--n", "0", "--out", str(tmp_path), "--quiet"]) == 2
    assert "n must be a positive integer" in capsys.readouterr().err


def test_signs_occur_alone_and_each_alone_can_be_positive() -> None:
    """Over 1500 phantoms every sign occurs as the only sign, and each such lone sign makes some positives."""
    phantoms = [make_phantom(seed, 16) for seed in range(1500)]
    positives = sum(p.label for p in phantoms)
    for name in SIGNS:
        alone = [p for p in phantoms if p.severities[name] > 0 and sum(v > 0 for v in p.severities.values()) == 1]
        lone_positives = sum(p.label for p in alone)
        assert lone_positives >= 0.03 * positives, (name, lone_positives, positives)
    no_cardio = [p for p in phantoms if p.severities["cardiomegaly"] == 0]
    assert sum(p.label for p in no_cardio) >= 0.3 * positives


def test_no_single_sign_decides_the_label() -> None:
    """Every weight is below the margin from the intercept to the threshold's log: a sign needs severity to count."""
    margin = np.log10(BNP_THRESHOLD) - 1.48
    assert all(0.5 * margin < weight < 2 * margin for weight in BNP_WEIGHTS.values())


def test_effusion_left_right_or_both() -> None:
    """One-sided effusions occur on either side, and the mask is only on that side's half of the image."""
    sides = {"right": 0, "left": 0, "both": 0}
    for seed in range(300):
        phantom = make_phantom(seed, 32)
        right, left = phantom.effusion_sides
        if phantom.severities["effusion"] == 0:
            assert right == left == 0
            continue
        sides["both" if right and left else "right" if right else "left"] += 1
    assert min(sides.values()) >= 10, sides
    seed = _first_seed(lambda p: p.effusion_sides[0] > 0.4 and p.effusion_sides[1] == 0)
    mask = make_phantom(seed, 64).masks["effusion"]
    assert mask[:, :32].sum() > 0 and mask[:, 32:].sum() == 0  # patient's right = image left (PA view)


@pytest.mark.parametrize("size", [64, 256])
def test_twin_same_patient_zero_difference_outside_the_masks(size: int) -> None:
    """The twin shares anatomy and noise: it equals the phantom exactly outside the sign masks, differs inside."""
    for seed in range(12):
        phantom, twin = make_phantom(seed, size), make_twin(seed, size)
        union = np.zeros_like(phantom.image, dtype=bool)
        for name in SIGNS:
            union |= phantom.masks[name]
        assert np.array_equal(phantom.image[~union], twin[~union]), seed
        if any(phantom.severities.values()):
            assert np.abs(phantom.image - twin)[union].max() > 0.02, seed
        else:
            assert np.array_equal(phantom.image, twin)


def test_twin_is_a_pure_function_of_the_seed() -> None:
    """Same seed, same twin; another seed, another patient."""
    assert np.array_equal(make_twin(7, 64), make_twin(7, 64))
    assert not np.array_equal(make_twin(7, 64), make_twin(8, 64))


def test_twin_of_cardiomegaly_has_a_normal_heart() -> None:
    """x - twin over an enlarged heart is positive (denser) and the twin's own heart is normal sized."""
    seed = _first_seed(lambda p: p.severities["cardiomegaly"] > 0.6 and p.severities["effusion"] == 0)
    phantom, twin = make_phantom(seed, 128), make_twin(seed, 128)
    added = (phantom.image - twin)[phantom.masks["cardiomegaly"]]
    assert added.mean() > 0.01


def test_write_phantoms_with_twins(tmp_path: Path) -> None:
    """--twins writes a twin per phantom, listed in labels.csv; the DICOM twin has its own SOP instance."""
    csv_path = write_phantoms(3, 5, tmp_path / "png", "png", size=48, twins=True)
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for index, row in enumerate(rows):
        with Image.open(csv_path.parent / row["twin"]) as image:
            pixels = np.asarray(image, dtype=np.float32) / 255.0
        assert np.abs(pixels - make_twin(5 + index, 48)).max() <= 0.5 / 255 + 1e-6
    csv_path = write_phantoms(1, 9, tmp_path / "dcm", "dicom", size=64, twins=True)
    with csv_path.open(newline="") as handle:
        row = next(csv.DictReader(handle))
    source, twin = pydicom.dcmread(csv_path.parent / row["path"]), pydicom.dcmread(csv_path.parent / row["twin"])
    assert source.PatientID == twin.PatientID
    assert source.SOPInstanceUID != twin.SOPInstanceUID and source.StudyInstanceUID != twin.StudyInstanceUID


def test_cli_phantoms_twins(tmp_path: Path) -> None:
    """gvr phantoms --twins writes twins/."""
    argv = ["--n", "2", "--seed", "3", "--out", str(tmp_path), "--format", "png", "--size", "32", "--quiet"]
    assert phantoms_cli.main([*argv, "--twins"]) == 0
    assert len(list((tmp_path / "twins").glob("*.png"))) == 2
