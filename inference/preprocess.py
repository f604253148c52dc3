"""One preprocessing path from a radiograph to a model image, for training and inference.

The model only ever sees what this module makes: the Modality LUT (rescale),
the image's own VOI LUT or window when present, MONOCHROME1 inverted so that
brighter always means more attenuation, intensities min-max scaled, the
physical pixel aspect made square (PixelSpacing / ImagerPixelSpacing /
PixelAspectRatio), the field padded to a centred square, then an antialiased
resize to ``R x R`` and a scale to ``[-1, 1]``. Training images go through the
same functions (``array_to_model_image`` for in-memory phantoms), so a model
never meets a differently prepared image at inference.

``Geometry`` remembers the padding and the original grid, so a map computed in
model space (a rationale) can be drawn back onto the original pixels.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from node.limits import LimitExceededError, ResourceLimits, check_encoded, check_image_header, check_spacing

if TYPE_CHECKING:
    from pydicom import Dataset

logger = logging.getLogger(__name__)

MIN_SIDE = 64
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")


class UnusableImageError(ValueError):
    """The file or dataset cannot become a model image (colour, multi-frame, no pixels, too small)."""


@dataclass(frozen=True)
class Geometry:
    """Where the original pixel grid sits inside the padded square that became the model image.

    ``padded_rows x padded_cols`` is the padded grid in *original* pixel units
    (anisotropic pixels give a non-square grid that is square in millimetres);
    the original image occupies rows ``pad_top .. pad_top + rows`` and columns
    ``pad_left .. pad_left + cols`` of it.
    """

    rows: int
    cols: int
    pad_top: int
    pad_left: int
    padded_rows: int
    padded_cols: int
    resolution: int

    def __post_init__(self) -> None:
        if min(self.rows, self.cols, self.padded_rows, self.padded_cols, self.resolution) < 1:
            raise ValueError(f"Geometry sizes must be positive, got {self!r}")
        if self.pad_top < 0 or self.pad_left < 0:
            raise ValueError(f"Geometry padding must be >= 0, got {self!r}")
        if self.pad_top + self.rows > self.padded_rows or self.pad_left + self.cols > self.padded_cols:
            raise ValueError(f"Geometry: the image does not fit inside its padded grid: {self!r}")

    def to_original(self, model_map: np.ndarray) -> np.ndarray:
        """Resample an ``R x R`` map in model space onto the original ``rows x cols`` grid.

        Raises:
            ValueError: the map is not ``resolution x resolution``.
        """
        r = self.resolution
        if model_map.shape != (r, r):
            raise ValueError(f"to_original expects a {r} x {r} map, got shape {model_map.shape}")
        sy, sx = r / self.padded_rows, r / self.padded_cols
        box = (self.pad_left * sx, self.pad_top * sy,
               (self.pad_left + self.cols) * sx, (self.pad_top + self.rows) * sy)
        image = Image.fromarray(np.ascontiguousarray(model_map, dtype=np.float32), mode="F")
        resized = image.resize((self.cols, self.rows), Image.Resampling.BILINEAR, box=box)
        return np.asarray(resized, dtype=np.float32)


@dataclass(frozen=True)
class ModelImage:
    """A preprocessed image: ``pixels`` is float32 ``R x R`` in [-1, 1]."""

    pixels: np.ndarray
    geometry: Geometry

    def __post_init__(self) -> None:
        r = self.geometry.resolution
        if self.pixels.shape != (r, r) or self.pixels.dtype != np.float32:
            raise ValueError(
                f"ModelImage.pixels must be float32 {r} x {r}, got {self.pixels.dtype} {self.pixels.shape}"
            )


def normalise_intensity(values: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 1]; a constant image becomes all zeros."""
    values = np.asarray(values, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


def array_to_model_image(
    intensity: np.ndarray, resolution: int, spacing: tuple[float, float] = (1.0, 1.0),
    limits: ResourceLimits | None = None,
) -> tuple[np.ndarray, Geometry]:
    """Display-ready intensities (brighter = more attenuation) -> model image and geometry.

    ``spacing`` is (row spacing, column spacing) in any unit; only its ratio matters, and
    it is bounded by ``limits.max_spacing_ratio`` before the padded grid is allocated
    (issue 9: ``1\\0.000000001`` asked for 14.9 TiB).
    """
    try:
        check_spacing(spacing, limits or ResourceLimits())
    except LimitExceededError as exc:
        raise UnusableImageError(exc.reason) from exc
    if intensity.ndim != 2:
        raise UnusableImageError(f"expected a 2-D grayscale image, got shape {intensity.shape}")
    rows, cols = intensity.shape
    if min(rows, cols) < MIN_SIDE:
        raise UnusableImageError(
            f"image is {rows} x {cols} pixels; at least {MIN_SIDE} px on each side is needed"
        )
    row_mm, col_mm = (float(s) for s in spacing)
    if row_mm <= 0 or col_mm <= 0:
        row_mm = col_mm = 1.0
    side_mm = max(rows * row_mm, cols * col_mm)
    padded_rows = max(rows, round(side_mm / row_mm))
    padded_cols = max(cols, round(side_mm / col_mm))
    geometry = Geometry(rows, cols, (padded_rows - rows) // 2, (padded_cols - cols) // 2,
                        padded_rows, padded_cols, resolution)
    unit = normalise_intensity(intensity)
    padded = np.zeros((padded_rows, padded_cols), dtype=np.float32)
    padded[geometry.pad_top:geometry.pad_top + rows, geometry.pad_left:geometry.pad_left + cols] = unit
    resized = Image.fromarray(padded, mode="F").resize((resolution, resolution), Image.Resampling.BILINEAR)
    pixels = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0) * 2.0 - 1.0
    return pixels.astype(np.float32), geometry


def _dicom_spacing(ds: Dataset) -> tuple[float, float]:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = getattr(ds, keyword, None)
        if value is not None and len(value) == 2:
            return float(value[0]), float(value[1])
    ratio = getattr(ds, "PixelAspectRatio", None)
    if ratio is not None and len(ratio) == 2 and float(ratio[1]) > 0:
        return float(ratio[0]), float(ratio[1])
    return 1.0, 1.0


def check_usable(ds: Dataset) -> None:
    """Raise UnusableImageError when a dataset is not a single-frame grayscale image."""
    if "PixelData" not in ds:
        raise UnusableImageError("dataset has no pixel data (PixelData is missing)")
    samples = int(getattr(ds, "SamplesPerPixel", 1))
    if samples != 1:
        raise UnusableImageError(
            f"colour image (SamplesPerPixel={samples}, {getattr(ds, 'PhotometricInterpretation', '?')}); "
            "a grayscale radiograph is needed"
        )
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise UnusableImageError(f"multi-frame image (NumberOfFrames={frames}); one frame is needed")
    rows, cols = int(getattr(ds, "Rows", 0)), int(getattr(ds, "Columns", 0))
    if min(rows, cols) < MIN_SIDE:
        raise UnusableImageError(f"image is {rows} x {cols} pixels; at least {MIN_SIDE} px on each side is needed")


def dicom_to_model_image(
    ds: Dataset, resolution: int, limits: ResourceLimits | None = None
) -> tuple[np.ndarray, Geometry]:
    """A pydicom Dataset -> (float32 ``R x R`` in [-1, 1], Geometry).

    Raises:
        UnusableImageError: no pixel data, colour, multi-frame, smaller than 64 px, or over
            a resource limit (checked from the header before the pixels are decoded).
    """
    from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

    limits = limits or ResourceLimits()
    check_usable(ds)
    try:
        check_image_header(ds, limits)
    except LimitExceededError as exc:
        raise UnusableImageError(exc.reason) from exc
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises several types for undecodable pixel data
        # the type only: decoder messages may quote the data
        raise UnusableImageError(f"pixel data cannot be decoded ({type(exc).__name__})") from exc
    values = apply_modality_lut(stored, ds).astype(np.float64)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = np.asarray(apply_voi_lut(values, ds, prefer_lut=True), dtype=np.float64)
    if str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        values = values.max() + values.min() - values
    return array_to_model_image(values, resolution, _dicom_spacing(ds), limits)


def spooled_dicom_to_model_image(
    path: Path | str, resolution: int, limits: ResourceLimits
) -> tuple[np.ndarray, Geometry]:
    """A received instance -> model image, each resource limit checked again before anything is inflated or decoded.

    The node checked the same limits when it stored the file; the worker's settings, or
    the file, may differ, and the worker is the one that decodes.
    """
    import pydicom

    try:
        if Path(path).stat().st_size > limits.max_instance_bytes:
            raise UnusableImageError(f"the file is larger than {limits.max_instance_bytes // 2**20} MB (max_instance_mb)")
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UnusableImageError(f"cannot read the spooled file ({exc.strerror or type(exc).__name__})") from exc
    try:
        check_encoded(data, limits)
        ds = pydicom.dcmread(io.BytesIO(data))
    except LimitExceededError as exc:
        raise UnusableImageError(exc.reason) from exc
    except Exception as exc:  # untrusted bytes: pydicom, zlib and struct raise many types
        raise UnusableImageError(f"not a readable DICOM file ({type(exc).__name__})") from exc
    return dicom_to_model_image(ds, resolution, limits)


def is_dicom_file(path: Path) -> bool:
    """True for a DICOM Part 10 file (the 'DICM' marker) whatever its suffix."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def image_file_to_model_image(path: Path | str, resolution: int) -> tuple[np.ndarray, Geometry]:
    """A DICOM, PNG or JPEG file -> (model image, Geometry). Colour PNG/JPEG are made grayscale.

    Raises:
        UnusableImageError: the file cannot become a model image.
    """
    path = Path(path)
    if is_dicom_file(path):
        import pydicom
        from pydicom.errors import InvalidDicomError

        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError) as exc:
            raise UnusableImageError(f"{path}: not a readable DICOM file: {exc}") from exc
        return dicom_to_model_image(ds, resolution)
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I", "I;16", "I;16B", "F"):
                values = np.asarray(image, dtype=np.float64)
            else:
                values = np.asarray(image.convert("L"), dtype=np.float64)
    except OSError as exc:
        raise UnusableImageError(f"{path}: not a readable image file: {exc}") from exc
    return array_to_model_image(values, resolution)
