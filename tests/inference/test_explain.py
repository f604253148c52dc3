"""gvr explain: pictures at the source resolution, a cine GIF, JSON numbers, unusable files reported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from inference.bundle import MANIFEST_FILE, read_manifest
from inference.cli import explain as explain_cli
from inference.preprocess import dicom_to_model_image
from node.artefacts import ImageResult
from node.results.overlay import Caption, display_image, healthy_image, render_overlay
from training.phantom_dicom import save_dicom
from training.phantoms import make_phantom


@pytest.fixture
def dicom_files(tmp_path: Path) -> list[Path]:
    """Two phantom radiographs of different sizes, and a file that is not DICOM."""
    paths = []
    for seed, size in ((11, 96), (12, 128)):
        path = tmp_path / "in" / f"phantom-{seed}.dcm"
        path.parent.mkdir(exist_ok=True)
        save_dicom(make_phantom(seed, size), path)
        paths.append(path)
    broken = tmp_path / "in" / "broken.dcm"
    broken.write_bytes(b"not dicom" * 30)
    return [*paths, broken]


def test_explain_writes_pictures_gif_and_json(dicom_files: list[Path], tiny_bundle_dir: Path,
                                              tmp_path: Path) -> None:
    """Per file: PNGs at the source size, raw maps at model size, result.json; the broken file is listed; exit 1."""
    out = tmp_path / "out"
    status = explain_cli.main([*map(str, dicom_files), "--bundle", str(tiny_bundle_dir), "--out", str(out),
                               "--frames", "5", "--max-steps", "50"])
    assert status == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [Path(r["file"]).name for r in summary["images"]] == ["phantom-11.dcm", "phantom-12.dcm"]
    assert [Path(f["file"]).name for f in summary["not_used"]] == ["broken.dcm"]
    resolution = read_manifest(tiny_bundle_dir).resolution
    for record, size in zip(summary["images"], (96, 128), strict=True):
        folder = out / record["folder"]
        for name in ("input", "reconstruction", "healthy"):
            with Image.open(folder / f"{name}.png") as picture:
                assert picture.size == (size, size)
        with Image.open(folder / "rationale.png") as overlay:
            assert overlay.width > size and overlay.mode == "RGB"
        for name in ("rationale", "healthy"):
            array = np.load(folder / f"{name}.npy")
            assert array.dtype == np.float32 and array.shape == (resolution, resolution)
        shown = record["positive"] and not record["ood_flag"]
        assert (folder / "side-by-side.png").is_file() == shown == (folder / "cine.gif").is_file()
        if shown:
            with Image.open(folder / "cine.gif") as gif:
                assert gif.is_animated and gif.n_frames == 2 * 5 - 2
        numbers = json.loads((folder / "result.json").read_text())
        assert 0 <= numbers["probability_healthy"] <= 1 and numbers["steps"] <= 50
        assert numbers["model"]["name"] == read_manifest(tiny_bundle_dir).name
        assert isinstance(numbers["ood_flag"], bool)
        assert numbers["positive"] == (numbers["probability"] >= numbers["decision_threshold"])


def _bundle_with(source: Path, folder: Path, threshold: float, scale: float) -> Path:
    """A copy of ``source`` with another decision threshold and colour scale, and no image called unusual."""
    shutil.copytree(source, folder)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["decision_threshold"] = threshold
    manifest["reconstruction_error"] = {"p50": 10.0, "p95": 10.0, "p99": 10.0}
    manifest["display"] = {"rationale_scale": scale}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return folder


def test_explain_rationale_npy_matches_overlay_and_negative_has_none(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    """rationale.npy (model space) upsampled is exactly what rationale.png draws, at the bundle's scale;
    healthy.npy is the model image minus it; a negative gets a grey overlay, no side-by-side, no cine."""
    path = tmp_path / "in" / "phantom.dcm"
    path.parent.mkdir()
    save_dicom(make_phantom(31, 112), path)
    ds = pydicom.dcmread(path)
    base = display_image(ds)
    for label, threshold in (("positive", 0.001), ("negative", 0.999)):
        bundle = _bundle_with(tiny_bundle_dir, tmp_path / f"bundle-{label}", threshold, 0.05)
        manifest = read_manifest(bundle)
        out = tmp_path / label
        assert explain_cli.main([str(path), "--bundle", str(bundle), "--out", str(out), "--max-steps", "30"]) == 0
        folder = out / "phantom"
        record = json.loads((folder / "result.json").read_text())
        assert record["positive"] == (label == "positive") and record["rationale_scale"] == 0.05
        rationale = np.load(folder / "rationale.npy")
        model_image, geometry = dicom_to_model_image(ds, manifest.resolution)
        np.testing.assert_allclose(np.load(folder / "healthy.npy"), np.clip(model_image - rationale, -1, 1),
                                   atol=1e-5)
        model = explain_cli.model_info(manifest)
        image = ImageResult("phantom", "", str(path), record["probability"], record["probability_healthy"],
                            record["positive"], record["steps"], record["ood_score"], record["ood_flag"])
        expected = render_overlay(base, geometry.to_original(rationale / 2.0), Caption.for_image(model, image))
        with Image.open(folder / "rationale.png") as overlay:
            drawn = np.asarray(overlay.convert("RGB"))
        np.testing.assert_array_equal(drawn, expected)
        with Image.open(folder / "healthy.png") as healthy:
            np.testing.assert_array_equal(np.asarray(healthy), np.rint(healthy_image(
                base, geometry.to_original(rationale / 2.0)) * 255).astype(np.uint8))
        picture = drawn[:112].astype(int)
        coloured = np.abs(picture[..., 0] - picture[..., 2]).max() > 0
        assert coloured == (label == "positive")  # the colour bar at least, for the positive
        assert (folder / "side-by-side.png").is_file() == (folder / "cine.gif").is_file() == (label == "positive")


def test_explain_same_stems_get_distinct_folders(tmp_path: Path, tiny_bundle_dir: Path) -> None:
    """Two files named alike in different folders do not overwrite each other; all used: exit 0."""
    paths = []
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        save_dicom(make_phantom(20, 64), tmp_path / sub / "image.dcm")
        paths.append(str(tmp_path / sub / "image.dcm"))
    out = tmp_path / "out"
    assert explain_cli.main([*paths, "--bundle", str(tiny_bundle_dir), "--out", str(out), "--max-steps", "5"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["image", "image-2", "summary.json"]


def test_explain_bad_options_exit_2(tmp_path: Path, dicom_files: list[Path]) -> None:
    """A missing bundle or an invalid rationale option: exit status 2, nothing written."""
    out = tmp_path / "out"
    assert explain_cli.main([str(dicom_files[0]), "--bundle", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert explain_cli.main([str(dicom_files[0]), "--weight", "-1", "--out", str(out)]) == 2
    assert not out.exists()


def test_explain_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """--help lists the options with their defaults."""
    with pytest.raises(SystemExit):
        explain_cli.main(["--help"])
    text = capsys.readouterr().out
    assert "--max-steps" in text and "(default: 150)" in text
