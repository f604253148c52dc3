"""The overlay's in-place arithmetic and one-array assembly give the pixels of the formulae and PIL canvas first written."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian

from node.results import overlay, row_blocks, text
from tests.node.test_results import MODEL


def _reference_blend(base: np.ndarray, rationale: np.ndarray, scale: float) -> np.ndarray:
    """The formulae as first written (full-size table lookup, boolean masks)."""
    index = np.clip(rationale * np.float32(127.5 / scale) + np.float32(128.0), 0, 255).astype(np.uint8)
    weight = overlay._TINT_WEIGHTS.take(index)
    grey = np.rint(np.clip(base, 0.0, 1.0) * 255.0).astype(np.uint8)
    blended = np.repeat(grey[..., None], 3, axis=-1)
    tinted = weight > 0
    w = weight[tinted][:, None]
    mixed = grey[tinted][:, None].astype(np.uint16) * (256 - w) + overlay._TINT_COLOURS[index[tinted]] * w + 128
    blended[tinted] = (mixed >> 8).astype(np.uint8)
    return blended


@pytest.mark.parametrize("scale", [0.05, 0.4, 2.0])
def test_in_place_arithmetic_gives_the_same_pixels(scale: float) -> None:
    rng = np.random.default_rng(3)
    base = rng.random((257, 311), dtype=np.float32) * 1.2 - 0.1  # out of [0, 1] too
    rationale = rng.normal(0.0, 0.2, base.shape).astype(np.float32)
    assert np.array_equal(overlay.blend(base, rationale, scale), _reference_blend(base, rationale, scale))
    healthy = overlay.healthy_image(base, rationale)
    assert healthy.dtype == np.float32
    assert np.array_equal(healthy, np.clip(base - rationale, 0.0, 1.0).astype(np.float32))
    for image in (base, base.astype(np.float64)):
        assert np.array_equal(overlay._to_uint8(image), np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8))


def test_untinted_range_is_one_run() -> None:
    low, high = overlay._UNTINTED_LOW, overlay._UNTINTED_HIGH
    assert low < 128 < high and (overlay._TINT_WEIGHTS[low : high + 1] == 0).all()
    with pytest.raises(ValueError, match="one run"):
        overlay._untinted_range(np.array([0, 1, 0, 1], dtype=np.uint16))


def _reference_overlay(base: np.ndarray, rationale: np.ndarray, caption: overlay.Caption) -> np.ndarray:
    """render_overlay on a full-size PIL canvas, as first written."""
    rows, columns = base.shape
    size = text.font_size(columns)
    bar_width = max(size * 6, columns // 9)
    marked = caption.marked_layout(columns + bar_width - size, size)
    canvas = Image.new("RGB", (columns + bar_width, rows + text.band_height(len(marked), size)), (0, 0, 0))
    if caption.shows_rationale:
        canvas.paste(Image.fromarray(_reference_blend(base, rationale, caption.rationale_scale), "RGB"), (0, 0))
    else:
        canvas.paste(Image.fromarray(overlay._to_uint8(base), "L").convert("RGB"), (0, 0))
    canvas.paste(overlay._colour_bar(rows, bar_width, caption, size), (columns, 0))
    overlay._caption_band(canvas, rows, marked, size)
    return np.asarray(canvas, dtype=np.uint8)


def _reference_side_by_side(base: np.ndarray, healthy: np.ndarray, caption: overlay.Caption) -> np.ndarray:
    rows, columns = base.shape
    size = text.font_size(columns)
    gap = max(size // 2, 4)
    titles = [text.layout([[title]], columns - size, size) for title in (overlay.ORIGINAL_TITLE, overlay.HEALTHY_TITLE)]
    title_height = text.band_height(max(len(lines) for lines in titles), size) - size // 2
    marked = caption.marked_layout(2 * columns + gap - size, size)
    canvas = Image.new("L", (2 * columns + gap, title_height + rows + text.band_height(len(marked), size)), 0)
    canvas.paste(Image.fromarray(overlay._to_uint8(base), "L"), (0, title_height))
    canvas.paste(Image.fromarray(overlay._to_uint8(healthy), "L"), (columns + gap, title_height))
    draw = ImageDraw.Draw(canvas)
    for left, lines in zip((0, columns + gap), titles, strict=True):
        text.draw_lines(draw, (left + size // 2, size // 3), lines, size, 255)
    overlay._caption_band(canvas, title_height + rows, marked, size)
    return np.asarray(canvas, dtype=np.uint8)


@pytest.mark.parametrize("shape", [(300, 256), (700, 1100)])
@pytest.mark.parametrize("positive", [True, False])
def test_rendered_pictures_equal_the_canvas_versions(shape: tuple[int, int], positive: bool) -> None:
    rng = np.random.default_rng(5)
    base = rng.random(shape, dtype=np.float32)
    rationale = rng.normal(0.0, 0.2, shape).astype(np.float32)
    caption = overlay.Caption(finding="heart failure likely", probability=0.83 if positive else 0.05, threshold=0.5,
                              model_name=MODEL.name, model_version=MODEL.version, estimated_bnp=420.0,
                              rationale_scale=0.4)  # fmt: skip
    assert caption.shows_rationale is positive
    assert np.array_equal(overlay.render_overlay(base, rationale, caption), _reference_overlay(base, rationale, caption))
    healthy = overlay.healthy_image(base, rationale)
    assert np.array_equal(overlay.render_side_by_side(base, healthy, caption),
                          _reference_side_by_side(base, healthy, caption))  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grey_conversions_equal_the_float_formulae(dtype: type) -> None:
    """to_grey and healthy_grey give the pixels _to_uint8 gives of the display and healthy images."""
    rng = np.random.default_rng(7)
    base = (rng.random((203, 157)) * 1.2 - 0.1).astype(dtype)  # out of [0, 1] too
    rationale = rng.normal(0.0, 0.3, base.shape).astype(np.float32)
    grey = overlay.to_grey(base)
    assert grey.dtype == np.uint8 and np.array_equal(grey, overlay._to_uint8(base))
    assert overlay.to_grey(grey) is grey
    healthy = overlay.healthy_grey(base, rationale)
    assert np.array_equal(healthy, overlay._to_uint8(overlay.healthy_image(base, rationale)))
    assert np.array_equal(healthy, np.rint(np.clip(base - rationale, 0.0, 1.0).astype(np.float32) * 255.0)
                          .astype(np.uint8))  # fmt: skip
    with pytest.raises(ValueError, match="source grid"):
        overlay.healthy_grey(base, rationale[:-1])


@pytest.mark.parametrize("shape", [(300, 256), (701, 1103)])
@pytest.mark.parametrize("positive", [True, False])
def test_pictures_from_grey_equal_those_from_the_display_image(shape: tuple[int, int], positive: bool) -> None:
    """What build_for_image passes (grey once, healthy_grey) draws the pictures of the float images."""
    rng = np.random.default_rng(11)
    base = rng.random(shape, dtype=np.float32)
    rationale = rng.normal(0.0, 0.2, shape).astype(np.float32)
    caption = overlay.Caption(finding="heart failure likely", probability=0.83 if positive else 0.05, threshold=0.5,
                              model_name=MODEL.name, model_version=MODEL.version, rationale_scale=0.4)  # fmt: skip
    grey = overlay.to_grey(base)
    assert np.array_equal(overlay.render_overlay(grey, rationale, caption), _reference_overlay(base, rationale, caption))
    assert np.array_equal(overlay.blend(grey, rationale, 0.4), _reference_blend(base, rationale, 0.4))
    healthy = overlay.healthy_image(base, rationale)
    assert np.array_equal(overlay.render_side_by_side(grey, overlay.healthy_grey(base, rationale), caption),
                          _reference_side_by_side(base, healthy, caption))  # fmt: skip


@pytest.mark.parametrize("block_values", [1, 97, 1 << 18])
def test_row_blocks_equal_the_whole_array_formulae(monkeypatch: pytest.MonkeyPatch, block_values: int) -> None:
    """Blocks of one row, of a part of a row, of several rows with a short last one: the whole-array values."""
    monkeypatch.setattr(row_blocks, "BLOCK_VALUES", block_values)
    rng = np.random.default_rng(13)
    base = rng.random((389, 171), dtype=np.float32) * 1.4 - 0.2
    rationale = rng.normal(0.0, 0.3, base.shape).astype(np.float32)
    for image in (base, base.astype(np.float64), base[:, 0], np.stack([base, base], axis=-1), base[:0]):
        assert np.array_equal(row_blocks.to_uint8(image), np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8))
    assert np.array_equal(row_blocks.difference_to_uint8(base, rationale),
                          overlay._to_uint8(np.clip(base - rationale, 0.0, 1.0)))  # fmt: skip
    for scale in (0.05, 0.4, 2.0):
        for values in (rationale, rationale.astype(np.float64)):
            expected = np.clip(values * np.float32(127.5 / scale) + np.float32(128.0), 0, 255).astype(np.uint8)
            assert np.array_equal(row_blocks.tint_index(values, scale), expected)
            positions, picked = row_blocks.tinted(values, scale, (100, 150))
            found = np.flatnonzero((expected < 100) | (expected > 150))
            assert np.array_equal(positions, found) and np.array_equal(picked, expected.ravel()[found])
    with pytest.raises(ValueError, match="float32 images of one shape"):
        row_blocks.difference_to_uint8(base, rationale[1:])
    for rows, columns in ((5, 2), (389, 171), (1, 10**6)):
        slices = list(row_blocks.blocks(rows, columns))
        assert [s.start for s in slices] == [0, *[s.stop for s in slices[:-1]]] and slices[-1].stop == rows
        assert all(0 < s.stop - s.start <= max(1, block_values // columns) for s in slices)


def _reference_display(ds: Dataset) -> np.ndarray:
    """display_image as written before the row blocks: whole-array float32 steps (pydicom for the rest)."""
    if "ModalityLUTSequence" in ds:
        values = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
    else:
        values = ds.pixel_array.astype(np.float32)
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        if slope != 1.0:
            values *= np.float32(slope)
        if intercept != 0.0:
            values += np.float32(intercept)
    linear = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper() == "LINEAR"
    if "VOILUTSequence" in ds or ("WindowCenter" in ds and not linear):
        values = apply_voi_lut(values.astype(np.float64), ds, index=0).astype(np.float32)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        centre, width = overlay._first(ds.WindowCenter), max(overlay._first(ds.WindowWidth), 1.0)
        if width == 1.0:
            values = (values >= np.float32(centre - 0.5)).astype(np.float32)
        else:
            values -= np.float32(centre - 0.5)
            values *= np.float32(1.0 / (width - 1.0))
            values += np.float32(0.5)
            np.clip(values, 0.0, 1.0, out=values)
    low, high = float(values.min()), float(values.max())
    scaled = values
    if high > low:
        scaled -= np.float32(low)
        scaled *= np.float32(1.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        scaled = np.float32(1.0) - scaled
    return scaled.astype(np.float32, copy=False)


def _source(pixels: np.ndarray) -> Dataset:
    ds = Dataset()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8 * pixels.itemsize
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, int(pixels.dtype.kind == "i")
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


_VARIANTS = ["plain", "window", "width one", "two windows", "rescaled", "negative slope", "monochrome1",
             "constant", "signed", "bytes", "sigmoid", "modality lut"]  # fmt: skip


@pytest.mark.parametrize("variant", _VARIANTS)
@pytest.mark.parametrize("block_values", [97, 1 << 18])
def test_display_image_in_row_blocks_equals_the_whole_array_steps(
    monkeypatch: pytest.MonkeyPatch, variant: str, block_values: int
) -> None:
    monkeypatch.setattr(row_blocks, "BLOCK_VALUES", block_values)
    rng = np.random.default_rng(17)
    dtype = {"signed": np.int16, "bytes": np.uint8}.get(variant, np.uint16)
    top = {"signed": 2000, "bytes": 255}.get(variant, 4095)
    pixels = rng.integers(-top if variant == "signed" else 0, top + 1, (613, 701)).astype(dtype)
    ds = _source(np.full_like(pixels, 7) if variant == "constant" else pixels)
    if variant in ("window", "rescaled", "negative slope", "monochrome1", "sigmoid", "signed", "modality lut"):
        ds.WindowCenter, ds.WindowWidth = 1800, 2400
    if variant == "width one":
        ds.WindowCenter, ds.WindowWidth = 2000, 1
    if variant == "two windows":
        ds.WindowCenter, ds.WindowWidth = [1500, 2000], [1000, 3000]
    if variant in ("rescaled", "negative slope"):
        ds.RescaleSlope, ds.RescaleIntercept = ("0.5", "-100") if variant == "rescaled" else ("-1.5", "3000")
    if variant == "monochrome1":
        ds.PhotometricInterpretation = "MONOCHROME1"
    if variant == "sigmoid":
        ds.VOILUTFunction = "SIGMOID"
    if variant == "modality lut":
        item = Dataset()
        item.LUTDescriptor, item.ModalityLUTType = [4096, 0, 16], "US"
        item.LUTData = (np.arange(4096, dtype=np.uint16)[::-1] // 2).tolist()
        ds.ModalityLUTSequence = [item]
    fast = overlay.display_image(ds)
    assert fast.dtype == np.float32 and fast.shape == pixels.shape
    assert np.array_equal(fast, _reference_display(ds))
