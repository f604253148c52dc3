"""gvr explain: pictures at the source resolution, a cine GIF, JSON numbers, unusable files reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from inference.bundle import read_manifest
from inference.cli import explain as explain_cli
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
    """Per file: 4 PNGs at the source size, an animated GIF, result.json; the broken file is listed; exit 1."""
    out = tmp_path / "out"
    status = explain_cli.main([*map(str, dicom_files), "--bundle", str(tiny_bundle_dir), "--out", str(out),
                               "--frames", "5", "--max-steps", "50"])
    assert status == 1
    summary = json.loads((out / "summary.json").read_text())
    assert [Path(r["file"]).name for r in summary["images"]] == ["phantom-11.dcm", "phantom-12.dcm"]
    assert [Path(f["file"]).name for f in summary["not_used"]] == ["broken.dcm"]
    for record, size in zip(summary["images"], (96, 128), strict=True):
        folder = out / record["folder"]
        for name in ("input", "reconstruction", "healthy"):
            with Image.open(folder / f"{name}.png") as picture:
                assert picture.size == (size, size)
        with Image.open(folder / "rationale.png") as overlay:
            assert overlay.width > size and overlay.mode == "RGB"
        with Image.open(folder / "cine.gif") as gif:
            assert gif.is_animated and gif.n_frames == 2 * 5 - 2
        numbers = json.loads((folder / "result.json").read_text())
        assert 0 <= numbers["probability_healthy"] <= 1 and numbers["steps"] <= 50
        assert numbers["model"]["name"] == read_manifest(tiny_bundle_dir).name
        assert isinstance(numbers["ood_flag"], bool)
        assert numbers["positive"] == (numbers["probability"] >= numbers["decision_threshold"])


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
    assert "--max-steps" in text and "(default: 200)" in text
