"""Preprocessing: one path from DICOM/PNG to the model image, and back onto the original grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from inference.preprocess import (
    Geometry,
    ModelImage,
    UnusableImageError,
    dicom_to_model_image,
    image_file_to_model_image,
)


def _pixels(rows: int = 96, cols: int = 96, seed: int = 0) -> np.ndarray:
    """A 12-bit image with a bright disc and noise (something with structure to compare)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:rows, :cols]
    disc = ((yy - rows / 2) ** 2 + (xx - cols / 3) ** 2) < (min(rows, cols) / 4) ** 2
    values = 800 + 2000 * disc + rng.integers(0, 400, size=(rows, cols))
    return values.astype(np.uint16)


def _dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2") -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    return ds


def _roundtrip(ds: Dataset, tmp_path: Path) -> Dataset:
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def test_dicom_to_model_image_monochrome1_equals_monochrome2(tmp_path: Path) -> None:
    """MONOCHROME1 stored inverted gives the same model image as MONOCHROME2."""
    pixels = _pixels()
    mono2, _ = dicom_to_model_image(_roundtrip(_dataset(pixels), tmp_path), 64)
    mono1, _ = dicom_to_model_image(_roundtrip(_dataset(4095 - pixels, "MONOCHROME1"), tmp_path), 64)
    assert mono2.shape == (64, 64) and mono2.dtype == np.float32
    assert mono2.min() >= -1.0 and mono2.max() <= 1.0
    np.testing.assert_allclose(mono1, mono2, atol=1e-5)


def test_dicom_to_model_image_rle_compressed_equals_uncompressed(tmp_path: Path) -> None:
    """An RLE Lossless copy gives the identical model image."""
    ds = _dataset(_pixels(seed=1))
    plain, _ = dicom_to_model_image(_roundtrip(ds, tmp_path), 64)
    compressed = _dataset(_pixels(seed=1))
    compressed.compress(RLELossless)
    read = _roundtrip(compressed, tmp_path)
    assert read.file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(dicom_to_model_image(read, 64)[0], plain)


def test_dicom_to_model_image_jpeg2000_lossless_equals_uncompressed(tmp_path: Path) -> None:
    """A JPEG 2000 lossless copy gives the identical model image."""
    plain, _ = dicom_to_model_image(_dataset(_pixels(seed=2)), 64)
    compressed = _dataset(_pixels(seed=2))
    try:
        compressed.compress(JPEG2000Lossless)
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        pytest.skip(f"no JPEG 2000 encoder ({exc}); pip install pylibjpeg-openjpeg")
    np.testing.assert_array_equal(dicom_to_model_image(_roundtrip(compressed, tmp_path), 64)[0], plain)


def test_dicom_to_model_image_applies_window() -> None:
    """The dataset's own window saturates values outside it."""
    pixels = _pixels(seed=3)
    ds = _dataset(pixels)
    ds.WindowCenter, ds.WindowWidth = 1000, 400
    windowed, _ = dicom_to_model_image(ds, 64)
    plain, _ = dicom_to_model_image(_dataset(pixels), 64)
    # The window 800..1200 spans the background: it gets the full grey range, the disc saturates.
    assert float(windowed.mean()) > float(plain.mean()) + 0.5
    assert float((windowed >= 0.999).mean()) > 0.1


def test_dicom_to_model_image_honours_anisotropic_spacing() -> None:
    """Rows spaced half as far as columns: 128 x 64 pixels are a square field, no padding."""
    ds = _dataset(_pixels(rows=128, cols=64))
    ds.PixelSpacing = [0.5, 1.0]
    _, geometry = dicom_to_model_image(ds, 64)
    assert (geometry.pad_top, geometry.pad_left) == (0, 0)
    assert (geometry.padded_rows, geometry.padded_cols) == (128, 64)
    ds.PixelSpacing = [1.0, 1.0]
    _, square = dicom_to_model_image(ds, 64)
    assert (square.padded_rows, square.padded_cols, square.pad_left) == (128, 128, 32)


def test_geometry_to_original_maps_back_onto_the_pixel_grid() -> None:
    """A map in model space lands on rows x cols, with the padding cut away."""
    ds = _dataset(_pixels(rows=96, cols=160))
    pixels, geometry = dicom_to_model_image(ds, 64)
    back = geometry.to_original(pixels)
    assert back.shape == (96, 160)
    original = (_pixels(rows=96, cols=160).astype(np.float64))
    correlation = np.corrcoef(back.ravel(), original.ravel())[0, 1]
    assert correlation > 0.8
    with pytest.raises(ValueError, match="64 x 64"):
        geometry.to_original(np.zeros((32, 32)))


def test_dicom_to_model_image_rejects_missing_pixel_data() -> None:
    """No PixelData: a named rejection."""
    ds = _dataset(_pixels())
    del ds.PixelData
    with pytest.raises(UnusableImageError, match="no pixel data"):
        dicom_to_model_image(ds, 64)


def test_dicom_to_model_image_rejects_colour() -> None:
    """SamplesPerPixel 3: a named rejection."""
    ds = _dataset(_pixels())
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    with pytest.raises(UnusableImageError, match="SamplesPerPixel=3"):
        dicom_to_model_image(ds, 64)


def test_dicom_to_model_image_rejects_multiframe() -> None:
    """NumberOfFrames 2: a named rejection."""
    ds = _dataset(_pixels())
    ds.NumberOfFrames = 2
    with pytest.raises(UnusableImageError, match="NumberOfFrames=2"):
        dicom_to_model_image(ds, 64)


def test_dicom_to_model_image_rejects_small_image() -> None:
    """32 x 32 pixels: too small to be a radiograph."""
    with pytest.raises(UnusableImageError, match="at least 64 px"):
        dicom_to_model_image(_dataset(_pixels(rows=32, cols=32)), 64)


def test_image_file_to_model_image_png_equals_dicom(tmp_path: Path) -> None:
    """The same 8-bit pixels as PNG and as DICOM (without a suffix) give the same model image."""
    pixels = (_pixels(seed=4) // 16).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    ds = _dataset(pixels.astype(np.uint16))
    ds.save_as(tmp_path / "no-suffix", enforce_file_format=True)
    from_png, _ = image_file_to_model_image(tmp_path / "a.png", 32)
    from_dicom, _ = image_file_to_model_image(tmp_path / "no-suffix", 32)
    np.testing.assert_allclose(from_png, from_dicom, atol=1e-6)
    model_image = ModelImage(from_png, Geometry(96, 96, 0, 0, 96, 96, 32))
    assert model_image.pixels.shape == (32, 32)


def test_image_file_to_model_image_rejects_unreadable_file(tmp_path: Path) -> None:
    """A .png that is not an image: a named rejection, not a crash."""
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(UnusableImageError, match="not a readable image"):
        image_file_to_model_image(bad, 64)
