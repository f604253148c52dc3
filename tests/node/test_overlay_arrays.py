"""The overlay's in-place arithmetic and one-array assembly give the pixels of the formulae and PIL canvas first written."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from node.results import overlay, text
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
