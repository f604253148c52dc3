"""Pixels a radiologist looks at: the rationale overlay, original | healthy, and the cine frames.

Everything here is numpy and Pillow on 8-bit images; the DICOM wrapping lives
in ``secondary_capture`` and the text layout in ``text``. Each picture keeps the
radiograph at its own pixel grid and puts the captions and the colour bar in
margins beside it, so no text hides anatomy.

What is shown, and why it is shown this way:

- colour uses one scale for every patient (the bundle's, ``ModelInfo.colour_scale``),
  printed on the colour bar: a per-image scale would stretch a faint map of a
  near-threshold image to the same alarming colour as a certain positive;
- a negative prediction, or an image unlike the training data, gets no colour
  and says why ("no rationale: ..."): a map of what the model would remove from
  an image it does not call diseased is not a finding;
- the healthy image is the patient's own radiograph minus the rationale
  (``healthy_image``), at the source's resolution, not a blurry decoding;
- every burned-in word names what is shown: the cine's frames are the model's
  decodings, and its first frame says it is not the original.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pydicom import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

from node.artefacts import DEFAULT_RATIONALE_SCALE, ImageResult, ModelInfo
from node.results import row_blocks, text

DISCLAIMER = "NOT FOR DIAGNOSTIC USE"
NO_RATIONALE_NEGATIVE = "no rationale: prediction below threshold"
NO_RATIONALE_OOD = "no rationale: image unlike the training data"
ORIGINAL_TITLE = "original"
HEALTHY_TITLE = "healthy counterfactual: disease removed by the model"
CINE_FIRST = "model decoding (not the original)"
CINE_MIDDLE = "model decoding, removing disease"
CINE_LAST = "model decoding, disease removed"
OVERLAY_OPACITY = 0.55
OVERLAY_FLOOR = 0.15  # fraction of the scale under which nothing is tinted
CINE_MIN_SIZE = 512
_WARNING_COLOUR = (255, 210, 0)
_TEXT_COLOUR = (255, 255, 255)


@dataclass(frozen=True)
class Caption:
    """What is burned into every result picture, in reading order.

    ``rationale_scale`` is the fixed colour scale (display units) the overlay
    draws at full colour; ``shows_rationale`` says whether any colour is drawn.
    """

    finding: str
    probability: float
    threshold: float
    model_name: str
    model_version: str
    probability_healthy: float | None = None
    ood_flag: bool = False
    estimated_bnp: float | None = None
    rationale_scale: float = DEFAULT_RATIONALE_SCALE

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability {self.probability} must lie in [0, 1]")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold {self.threshold} must lie in (0, 1)")
        if not self.model_name or not self.model_version:
            raise ValueError("a caption needs the model name and version")
        if not 0.0 < self.rationale_scale <= 1.0:
            raise ValueError(f"rationale scale {self.rationale_scale} must lie in (0, 1] (display units)")

    @classmethod
    def for_image(cls, model: ModelInfo, image: ImageResult) -> Caption:
        return cls(
            finding=image.finding,
            probability=image.probability,
            threshold=model.threshold,
            model_name=model.name,
            model_version=model.version,
            probability_healthy=image.probability_healthy,
            ood_flag=image.ood_flag,
            estimated_bnp=image.estimated_bnp,
            rationale_scale=model.colour_scale,
        )

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold

    @property
    def no_rationale_reason(self) -> str | None:
        """Why no colour is drawn (burned in as is), or None when the rationale is shown."""
        if self.ood_flag:
            return NO_RATIONALE_OOD
        if not self.positive:
            return NO_RATIONALE_NEGATIVE
        return None

    @property
    def shows_rationale(self) -> bool:
        return self.no_rationale_reason is None

    def groups(self) -> list[list[str]]:
        """Phrases by line group: the disclaimer, the result, the rationale, the model, any warning.

        A group starts a new line; its phrases share lines as far as the width allows.
        """
        result = [f"AI: {self.finding}", f"p = {self.probability:.2f} (threshold {self.threshold:.2f})"]
        if self.estimated_bnp is not None:
            result.append(f"est. BNP {self.estimated_bnp:.0f} ng/L")
        reason = self.no_rationale_reason
        if reason is None:
            rationale = [
                "Colour: what the model removed to call the image healthy (GVR)",
                f"full colour at +/-{self.rationale_scale:.2f} intensity (0-1 grey range),",
                "the same scale for every patient",
            ]
            if self.probability_healthy is not None:
                rationale.append(f"model probability after removal: {self.probability_healthy:.2f}")
        else:
            rationale = [reason]
        groups = [[DISCLAIMER], result, rationale, [f"Model {self.model_name} {self.model_version}"]]
        if self.ood_flag:
            groups.append(["WARNING: image unlike the training data", "(out of distribution): result unreliable"])
        return groups

    def lines(self) -> list[str]:
        """The caption as text lines, one per group; the first is always the disclaimer."""
        return ["   ".join(group) for group in self.groups()]

    def layout(self, width: int, size: int) -> list[str]:
        """The caption's lines for a band ``width`` pixels wide: phrases wrap instead of being cut off."""
        return [line for line, _ in self.marked_layout(width, size)]

    def marked_layout(self, width: int, size: int) -> list[tuple[str, bool]]:
        """``layout`` with a flag per line: True for the disclaimer and warning lines (drawn in amber)."""
        groups = self.groups()
        marked: list[tuple[str, bool]] = []
        for number, group in enumerate(groups):
            warning = number == 0 or (self.ood_flag and number == len(groups) - 1)
            marked.extend((line, warning) for line in text.layout([group], width, size))
        return marked


def display_image(ds: Dataset) -> np.ndarray:
    """The source as a viewer shows it: float32 in [0, 1], bright = dense (MONOCHROME2).

    Applies the Modality LUT, then the first VOI window (or the full range),
    then inverts MONOCHROME1. Raises ValueError for colour or multi-frame sources.
    The common case (rescale slope/intercept, a LINEAR window) is computed here in
    float32; a LUT sequence or another VOI function goes through pydicom.
    """
    if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise ValueError(
            f"source {ds.get('SOPInstanceUID', '?')} is not a single-frame greyscale image: cannot overlay"
        )
    linear = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper() == "LINEAR"
    invert = ds.get("PhotometricInterpretation") == "MONOCHROME1"
    if "VOILUTSequence" in ds or ("WindowCenter" in ds and not linear):
        values = apply_voi_lut(_modality_values(ds).astype(np.float64), ds, index=0).astype(np.float32)
        return row_blocks.display(values, (1.0, 0.0), None, invert)
    window = (_first(ds.WindowCenter), _first(ds.WindowWidth)) if "WindowCenter" in ds and "WindowWidth" in ds \
        else None  # fmt: skip
    if "ModalityLUTSequence" in ds:
        return row_blocks.display(_modality_values(ds), (1.0, 0.0), window, invert)
    rescale = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    return row_blocks.display(ds.pixel_array, rescale, window, invert)  # no full-size float32 copy to start from


def _first(value: Any) -> float:
    """The first of a multi-valued DS (several windows), or the value."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return float(value[0])
    return float(value)


def _modality_values(ds: Dataset) -> np.ndarray:
    """Stored values through the Modality LUT, float32 (a LUT sequence through pydicom)."""
    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
    values = ds.pixel_array.astype(np.float32)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def healthy_image(base: np.ndarray, rationale: np.ndarray) -> np.ndarray:
    """The patient's own radiograph with the disease removed: ``clip(base - rationale, 0, 1)``.

    ``base`` is the source as displayed (``display_image``) and ``rationale`` the
    signed map upsampled onto the same grid, both in display units; where the
    rationale is 0 the healthy image *is* the original, pixel for pixel. This is
    ``x + upsample(G(z*) - G(z0))`` at the source's resolution: only what the
    model removed is blurred by the upsampling, never the rest of the chest.
    """
    _check_grid("rationale", rationale, base.shape)
    healthy: np.ndarray = base - rationale
    np.clip(healthy, 0.0, 1.0, out=healthy)  # in place: a full-size array less to allocate (and fault in)
    return healthy.astype(np.float32, copy=False)


def healthy_grey(base: np.ndarray, rationale: np.ndarray) -> np.ndarray:
    """``_to_uint8(healthy_image(base, rationale))``: the side-by-side's right half, as 8-bit grey."""
    _check_grid("rationale", rationale, base.shape)
    if base.dtype == rationale.dtype == np.float32:
        return row_blocks.difference_to_uint8(base, rationale)  # no full-size float image
    return _to_uint8(healthy_image(base, rationale))


def to_grey(image: np.ndarray) -> np.ndarray:
    """An image in [0, 1] (``display_image``, ``healthy_image``) as 8-bit grey; 8-bit grey as it is.

    The pictures take either: a caller that renders the same display image twice converts it once.
    """
    return image if image.dtype == np.uint8 else _to_uint8(image)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """``rint(clip(image, 0, 1) * 255)`` as uint8, a block of rows at a time (``row_blocks``)."""
    return row_blocks.to_uint8(image)


def _check_grid(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected the source grid {shape}")


def diverging_colours(t: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] for t in [-1, 1]: red to yellow where denser with disease, blue to cyan where lighter."""
    t = np.clip(t, -1.0, 1.0)
    pos, neg = np.clip(t, 0.0, 1.0), np.clip(-t, 0.0, 1.0)
    red = np.where(t >= 0, 1.0, 0.0)
    green = np.where(t >= 0, pos, neg)
    blue = np.where(t >= 0, 0.0, 1.0)
    return np.stack([red, green, blue], axis=-1)


def overlay_alpha(rationale: np.ndarray, scale: float) -> np.ndarray:
    """Per-pixel opacity of the tint: 0 under OVERLAY_FLOOR of ``scale``, OVERLAY_OPACITY at ``scale`` and above."""
    strength = np.clip((np.abs(rationale / scale) - OVERLAY_FLOOR) / (1.0 - OVERLAY_FLOOR), 0.0, 1.0)
    alpha: np.ndarray = OVERLAY_OPACITY * strength
    return alpha


def _tint_tables(levels: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Colour (uint8 RGB) and weight (0..256) of the tint for ``levels`` values of t spread over [-1, 1]."""
    t = np.linspace(-1.0, 1.0, levels)
    colours = _to_uint8(diverging_colours(t))
    weights = np.rint(overlay_alpha(t, 1.0) * 256.0).astype(np.uint16)
    return colours, weights


def _untinted_range(weights: np.ndarray) -> tuple[int, int]:
    """The table indices (lowest, highest) whose weight is 0: one run around t = 0, under the floor."""
    zero = np.flatnonzero(weights == 0)
    if len(zero) == 0 or zero[-1] - zero[0] + 1 != len(zero):
        raise ValueError(f"tint weights are 0 at {zero.tolist()}: expected one run of indices around t = 0")
    return int(zero[0]), int(zero[-1])


_TINT_COLOURS, _TINT_WEIGHTS = _tint_tables()
_UNTINTED_LOW, _UNTINTED_HIGH = _untinted_range(_TINT_WEIGHTS)


def blend(base: np.ndarray, rationale: np.ndarray, scale: float) -> np.ndarray:
    """The display image with the rationale tinted over it, RGB uint8, no bar or caption (the review page too).

    ``base`` is the display image in [0, 1] or as 8-bit grey (``to_grey``). The tint is looked
    up in 256-entry tables of t = rationale / scale (a step of 1/128 of the scale, below what
    an eye or a viewer's 8 bits tell apart) and mixed in integers: a fraction of the float
    version's time and memory at full resolution.
    """
    _check_grid("rationale", rationale, base.shape)
    return _blend_into(np.empty((*base.shape, 3), dtype=np.uint8), to_grey(base), rationale, scale)


def _grey_into(target: np.ndarray, grey: np.ndarray) -> None:
    """Each channel of ``target`` (rows, columns, 3; a view into a larger picture) set to ``grey``.

    One channel at a time: broadcasting ``grey[..., None]`` into the view took five times as long.
    """
    for channel in range(3):
        target[..., channel] = grey


def _blend_into(picture: np.ndarray, grey: np.ndarray, rationale: np.ndarray, scale: float) -> np.ndarray:
    """``blend`` written into the top left of ``picture`` (C-contiguous RGB): no RGB copy to paste.

    Returns ``picture``.
    """
    if not picture.flags.c_contiguous:  # reshape would copy it, and the tint would be lost
        raise ValueError("the picture to blend into must be one C-contiguous array")
    rows, columns = grey.shape
    _grey_into(picture[:rows, :columns], grey)
    # most of a chest is under the floor: mix only where there is a tint, found by comparing the
    # index with the table's untinted run, a block of rows at a time (a full-size table lookup took
    # longer than everything else here); flat positions, as 2-D index pairs picked ten times slower
    tinted, picked = row_blocks.tinted(rationale, scale, (_UNTINTED_LOW, _UNTINTED_HIGH))
    w = _TINT_WEIGHTS[picked][:, None]
    mixed = grey.ravel()[tinted][:, None].astype(np.uint16) * (256 - w) + _TINT_COLOURS[picked] * w + 128
    in_picture = tinted + tinted // columns * (picture.shape[1] - columns)  # the same pixel in the wider rows
    picture.reshape(-1, 3)[in_picture] = (mixed >> 8).astype(np.uint8)
    return picture


def _colour_bar(height: int, width: int, caption: Caption, size: int) -> Image.Image:
    """The scale beside the overlay: +scale (denser than healthy) at the top, -scale (lighter) below.

    Without a rationale the panel holds no colour, only the reason in words.
    """
    panel = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(panel)
    small = max(size * 3 // 4, 10)
    inner = width - size
    reason = caption.no_rationale_reason
    if reason is not None:
        lines = text.layout([[reason]], inner, small)
        text.draw_lines(draw, (size // 2, height // 3), lines, small, _TEXT_COLOUR)
        return panel
    scale = caption.rationale_scale
    top = text.layout([[f"+{scale:.2f}", "denser than healthy"]], inner, small)
    bottom = text.layout([[f"-{scale:.2f}", "lighter than healthy"]], inner, small)
    bar_top = size // 3 + text.line_height(small) * len(top) + size // 3
    bar_height = max(height - bar_top - text.line_height(small) * len(bottom) - size // 2, 16)
    colours = _to_uint8(diverging_colours(np.linspace(1.0, -1.0, bar_height)))
    bar = np.repeat(colours[:, None, :], max(width // 4, 6), axis=1)
    panel.paste(Image.fromarray(bar, "RGB"), (size // 2, bar_top))
    text.draw_lines(draw, (size // 2, size // 3), top, small, _TEXT_COLOUR)
    face = text.font(small)
    draw.text((size // 2 + bar.shape[1] + 4, bar_top + bar_height // 2 - small // 2), "0", fill=_TEXT_COLOUR,
              font=face)
    text.draw_lines(draw, (size // 2, bar_top + bar_height + size // 6), bottom, small, _TEXT_COLOUR)
    return panel


def _caption_band(canvas: Image.Image, top: int, marked: list[tuple[str, bool]], size: int) -> None:
    lines = [line for line, _ in marked]
    flags = [flag for _, flag in marked]
    fill: int | tuple[int, int, int] = _TEXT_COLOUR if canvas.mode == "RGB" else 255
    warning: int | tuple[int, int, int] = _WARNING_COLOUR if canvas.mode == "RGB" else 255
    text.draw_lines(ImageDraw.Draw(canvas), (size // 2, top + size // 2), lines, size, fill, flags, warning)


def render_overlay(base: np.ndarray, rationale: np.ndarray, caption: Caption) -> np.ndarray:
    """The radiograph with the rationale tinted over it, a colour bar and the caption: RGB uint8.

    ``base`` is the display image (``display_image``, or ``to_grey`` of it), ``rationale``
    the signed map at the same grid (display units). The radiograph keeps its size; the bar
    sits to its right, the caption below. Colour uses ``caption.rationale_scale``
    for every patient; without a rationale (negative, out of distribution) the
    radiograph stays grey and the bar says why.
    """
    _check_grid("rationale", rationale, base.shape)
    rows, columns = base.shape
    size = text.font_size(columns)
    bar_width = max(size * 6, columns // 9)
    marked = caption.marked_layout(columns + bar_width - size, size)
    # assembled in one array: only the bar and the caption band go through PIL (a full-size
    # canvas cost a fill, a paste and a copy out of ~27 MB each at 3000 px)
    out = np.zeros((rows + text.band_height(len(marked), size), columns + bar_width, 3), dtype=np.uint8)
    if caption.shows_rationale:
        _blend_into(out, to_grey(base), rationale, caption.rationale_scale)
    else:
        _grey_into(out[:rows, :columns], to_grey(base))
    out[:rows, columns:] = np.asarray(_colour_bar(rows, bar_width, caption, size), dtype=np.uint8)
    band = Image.new("RGB", (columns + bar_width, out.shape[0] - rows), (0, 0, 0))
    _caption_band(band, 0, marked, size)
    out[rows:] = np.asarray(band, dtype=np.uint8)
    return out


def render_side_by_side(base: np.ndarray, healthy: np.ndarray, caption: Caption) -> np.ndarray:
    """Original | healthy counterfactual (``healthy_image``), titled, with the caption below: greyscale uint8.

    Either image may come as 8-bit grey already (``to_grey``, ``healthy_grey``).
    """
    _check_grid("healthy image", healthy, base.shape)
    rows, columns = base.shape
    size = text.font_size(columns)
    gap = max(size // 2, 4)
    titles = [text.layout([[title]], columns - size, size) for title in (ORIGINAL_TITLE, HEALTHY_TITLE)]
    title_height = text.band_height(max(len(lines) for lines in titles), size) - size // 2
    marked = caption.marked_layout(2 * columns + gap - size, size)
    width, bottom = 2 * columns + gap, title_height + rows  # one array, as in render_overlay
    out = np.zeros((bottom + text.band_height(len(marked), size), width), dtype=np.uint8)
    out[title_height:bottom, :columns] = to_grey(base)
    out[title_height:bottom, columns + gap :] = to_grey(healthy)
    title_band = Image.new("L", (width, title_height), 0)
    draw = ImageDraw.Draw(title_band)
    for left, lines in zip((0, columns + gap), titles, strict=True):
        text.draw_lines(draw, (left + size // 2, size // 3), lines, size, 255)
    out[:title_height] = np.asarray(title_band, dtype=np.uint8)
    caption_band = Image.new("L", (width, out.shape[0] - bottom), 0)
    _caption_band(caption_band, 0, marked, size)
    out[bottom:] = np.asarray(caption_band, dtype=np.uint8)
    return out


def cine_label(index: int, frames: int) -> str:
    """What frame ``index`` (0-based) of ``frames`` shows: always a model decoding, never the original."""
    return CINE_FIRST if index == 0 else CINE_LAST if index == frames - 1 else CINE_MIDDLE


def render_cine(cine: np.ndarray, caption: Caption, min_size: int = CINE_MIN_SIZE) -> np.ndarray:
    """Frames from the model's decoding of the image to its healthy decoding, enlarged and labelled.

    Returns uint8 [F, R', C]. Each frame is scaled up to at least ``min_size``
    pixels (bicubic) so a viewer shows it at a readable size, with the
    disclaimer, what the frame is and the model in a band below it.
    """
    if cine.ndim != 3 or cine.shape[0] < 2:
        raise ValueError(f"cine must be [frames >= 2, rows, columns], got shape {cine.shape}")
    frames, rows, columns = cine.shape
    factor = max(1.0, min_size / max(rows, columns))
    width, height = round(columns * factor), round(rows * factor)
    size = text.font_size(width) if width >= 600 else 14
    labels = [
        text.layout([[DISCLAIMER], [f"frame {index + 1}/{frames}: {cine_label(index, frames)}"],
                     [f"Model {caption.model_name} {caption.model_version}"]], width - size, size)
        for index in range(frames)
    ]  # fmt: skip
    band = text.band_height(max(len(lines) for lines in labels), size)
    out = np.zeros((frames, height + band, width), dtype=np.uint8)
    for index in range(frames):
        frame = Image.fromarray(_to_uint8(cine[index]), "L").resize((width, height), Image.Resampling.BICUBIC)
        canvas = Image.new("L", (width, height + band), 0)
        canvas.paste(frame, (0, 0))
        text.draw_lines(ImageDraw.Draw(canvas), (size // 2, height + size // 2), labels[index], size, 255)
        out[index] = np.asarray(canvas, dtype=np.uint8)
    return out
