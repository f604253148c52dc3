"""Pixels a radiologist looks at: the rationale overlay, original | healthy, and the cine frames.

Everything here is numpy and Pillow on 8-bit images; the DICOM wrapping lives
in ``secondary_capture``. Text is burned in with Pillow's scalable default
font (Pillow >= 10.1), so no font package is needed. Each picture keeps the
radiograph at its own pixel grid and puts the captions and the colour bar in
margins beside it, so no text hides anatomy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

from node.artefacts import ImageResult, ModelInfo

DISCLAIMER = "NOT FOR DIAGNOSTIC USE"
MIN_RATIONALE_SCALE = 0.05  # a rationale weaker than 5 % grey is drawn faint, not stretched to full colour
OVERLAY_OPACITY = 0.55
OVERLAY_FLOOR = 0.15  # fraction of the scale under which nothing is tinted
CINE_MIN_SIZE = 512
_WARNING_COLOUR = (255, 210, 0)
_TEXT_COLOUR = (255, 255, 255)


@dataclass(frozen=True)
class Caption:
    """What is burned into every result picture, in reading order."""

    finding: str
    probability: float
    threshold: float
    model_name: str
    model_version: str
    probability_healthy: float | None = None
    ood_flag: bool = False
    estimated_bnp: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability {self.probability} must lie in [0, 1]")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold {self.threshold} must lie in (0, 1)")
        if not self.model_name or not self.model_version:
            raise ValueError("a caption needs the model name and version")

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
        )

    def groups(self) -> list[list[str]]:
        """Phrases by line group: the disclaimer, the result, the method, and any warning.

        A group starts a new line; its phrases share lines as far as the width allows.
        """
        result = [f"AI: {self.finding}", f"p = {self.probability:.2f} (threshold {self.threshold:.2f})"]
        if self.estimated_bnp is not None:
            result.append(f"est. BNP {self.estimated_bnp:.0f} ng/L")
        method = ["Rationale: GVR, original - healthy reconstruction"]
        if self.probability_healthy is not None:
            method.append(f"(p healthy = {self.probability_healthy:.2f})")
        method.append(f"Model {self.model_name} {self.model_version}")
        groups = [[DISCLAIMER], result, method]
        if self.ood_flag:
            groups.append(
                ["WARNING: image unlike the training data", "(out of distribution): result unreliable"]
            )
        return groups

    def lines(self) -> list[str]:
        """The caption as text lines, one per group; the first is always the disclaimer."""
        return ["   ".join(group) for group in self.groups()]

    def layout(self, width: int, size: int) -> list[str]:
        """The caption's lines for a band ``width`` pixels wide: phrases wrap instead of being cut off."""
        font = _font(size)
        lines: list[str] = []
        for group in self.groups():
            line = ""
            for phrase in group:
                candidate = f"{line}   {phrase}" if line else phrase
                if line and font.getlength(candidate) > width:
                    lines.append(line)
                    line = phrase
                else:
                    line = candidate
            lines.append(line)
        return lines


def display_image(ds: Dataset) -> np.ndarray:
    """The source as a viewer shows it: float32 in [0, 1], bright = dense (MONOCHROME2).

    Applies the Modality LUT, then the first VOI window (or the full range),
    then inverts MONOCHROME1. Raises ValueError for colour or multi-frame sources.
    """
    if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise ValueError(
            f"source {ds.get('SOPInstanceUID', '?')} is not a single-frame greyscale image: cannot overlay"
        )
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds, index=0).astype(np.float64)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        scaled = 1.0 - scaled
    return scaled.astype(np.float32)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _font_size(width: int) -> int:
    return max(12, width // 48)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    scaled: np.ndarray = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return scaled


def _check_grid(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected the source grid {shape}")


def rationale_scale(rationale: np.ndarray) -> float:
    """The |rationale| drawn at full colour: its 99.5th percentile, at least MIN_RATIONALE_SCALE."""
    return max(float(np.percentile(np.abs(rationale), 99.5)), MIN_RATIONALE_SCALE)


def diverging_colours(t: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] for t in [-1, 1]: red to yellow where denser with disease, blue to cyan where lighter."""
    t = np.clip(t, -1.0, 1.0)
    pos, neg = np.clip(t, 0.0, 1.0), np.clip(-t, 0.0, 1.0)
    red = np.where(t >= 0, 1.0, 0.0)
    green = np.where(t >= 0, pos, neg)
    blue = np.where(t >= 0, 0.0, 1.0)
    return np.stack([red, green, blue], axis=-1)


def _blend(base: np.ndarray, rationale: np.ndarray, scale: float) -> np.ndarray:
    t = rationale / scale
    strength = np.clip((np.abs(t) - OVERLAY_FLOOR) / (1.0 - OVERLAY_FLOOR), 0.0, 1.0)
    alpha = (OVERLAY_OPACITY * strength)[..., None]
    grey = np.repeat(base[..., None], 3, axis=-1)
    blended: np.ndarray = (1.0 - alpha) * grey + alpha * diverging_colours(t)
    return blended


def _draw_lines(draw: ImageDraw.ImageDraw, origin: tuple[int, int], lines: list[str], size: int) -> None:
    x, y = origin
    for number, line in enumerate(lines):
        warning = number == 0 or line.startswith(("WARNING", "(out of distribution)"))
        draw.text((x, y), line, fill=_WARNING_COLOUR if warning else _TEXT_COLOUR, font=_font(size))
        y += int(size * 1.35)


def _band_height(lines: int, size: int) -> int:
    return int(size * 1.35) * lines + size


def _colour_bar(height: int, width: int, scale: float, size: int) -> Image.Image:
    """A vertical bar, +scale (denser with disease) at the top, -scale (lighter) at the bottom."""
    panel = Image.new("RGB", (width, height), (0, 0, 0))
    margin = size * 2
    bar_height = max(height - 2 * margin, 16)
    ramp = np.linspace(1.0, -1.0, bar_height)
    colours = _to_uint8(diverging_colours(ramp))
    bar = np.repeat(colours[:, None, :], max(width // 4, 6), axis=1)
    panel.paste(Image.fromarray(bar, "RGB"), (size // 2, margin))
    draw = ImageDraw.Draw(panel)
    label_x = size // 2 + bar.shape[1] + 4
    font = _font(max(size * 3 // 4, 10))
    draw.text((size // 2, size // 3), "denser", fill=_TEXT_COLOUR, font=font)
    draw.text((label_x, margin), f"+{scale:.2f}", fill=_TEXT_COLOUR, font=font)
    draw.text((label_x, margin + bar_height // 2 - size // 2), "0", fill=_TEXT_COLOUR, font=font)
    draw.text((label_x, margin + bar_height - size), f"-{scale:.2f}", fill=_TEXT_COLOUR, font=font)
    draw.text((size // 2, height - margin + size // 3), "lighter", fill=_TEXT_COLOUR, font=font)
    return panel


def render_overlay(base: np.ndarray, rationale: np.ndarray, caption: Caption) -> np.ndarray:
    """The radiograph with the rationale tinted over it, a colour bar and the caption: RGB uint8.

    ``base`` is the display image (``display_image``), ``rationale`` the signed
    map at the same grid. The radiograph keeps its size; the bar sits to its
    right, the caption below.
    """
    _check_grid("rationale", rationale, base.shape)
    rows, columns = base.shape
    size = _font_size(columns)
    bar_width = max(size * 6, columns // 9)
    lines = caption.layout(columns + bar_width - size, size)
    canvas = Image.new("RGB", (columns + bar_width, rows + _band_height(len(lines), size)), (0, 0, 0))
    scale = rationale_scale(rationale)
    canvas.paste(Image.fromarray(_to_uint8(_blend(base, rationale, scale)), "RGB"), (0, 0))
    canvas.paste(_colour_bar(rows, bar_width, scale, size), (columns, 0))
    _draw_lines(ImageDraw.Draw(canvas), (size // 2, rows + size // 2), lines, size)
    return np.asarray(canvas, dtype=np.uint8)


def render_side_by_side(base: np.ndarray, healthy: np.ndarray, caption: Caption) -> np.ndarray:
    """Original | healthy reconstruction, titled, with the caption below: greyscale uint8."""
    _check_grid("healthy image", healthy, base.shape)
    rows, columns = base.shape
    size = _font_size(columns)
    gap = max(size // 2, 4)
    title = int(size * 1.8)
    lines = caption.layout(2 * columns + gap - size, size)
    canvas = Image.new("L", (2 * columns + gap, title + rows + _band_height(len(lines), size)), 0)
    canvas.paste(Image.fromarray(_to_uint8(base), "L"), (0, title))
    canvas.paste(Image.fromarray(_to_uint8(healthy), "L"), (columns + gap, title))
    draw = ImageDraw.Draw(canvas)
    draw.text((size // 2, size // 3), "ORIGINAL", fill=255, font=_font(size))
    draw.text(
        (columns + gap + size // 2, size // 3), "HEALTHY (GVR counterfactual)", fill=255, font=_font(size)
    )
    y = title + rows + size // 2
    for line in lines:
        draw.text((size // 2, y), line, fill=255, font=_font(size))
        y += int(size * 1.35)
    return np.asarray(canvas, dtype=np.uint8)


def render_cine(cine: np.ndarray, caption: Caption, min_size: int = CINE_MIN_SIZE) -> np.ndarray:
    """Frames from the original decoding to the healthy one, enlarged and labelled: uint8 [F, R', C].

    Each frame is scaled up to at least ``min_size`` pixels (bicubic) so a
    viewer shows it at a readable size, with the disclaimer and the frame
    position in a band below it.
    """
    if cine.ndim != 3 or cine.shape[0] < 2:
        raise ValueError(f"cine must be [frames >= 2, rows, columns], got shape {cine.shape}")
    frames, rows, columns = cine.shape
    factor = max(1.0, min_size / max(rows, columns))
    width, height = round(columns * factor), round(rows * factor)
    size = _font_size(width) if width >= 600 else 14
    band = _band_height(2, size)
    out = np.zeros((frames, height + band, width), dtype=np.uint8)
    for index in range(frames):
        frame = Image.fromarray(_to_uint8(cine[index]), "L").resize((width, height), Image.Resampling.BICUBIC)
        canvas = Image.new("L", (width, height + band), 0)
        canvas.paste(frame, (0, 0))
        label = "original" if index == 0 else "healthy" if index == frames - 1 else "towards healthy"
        text = [
            DISCLAIMER,
            f"frame {index + 1}/{frames}: {label}  ({caption.model_name} {caption.model_version})",
        ]
        draw = ImageDraw.Draw(canvas)
        for number, line in enumerate(text):
            draw.text(
                (size // 2, height + size // 2 + number * int(size * 1.35)), line, fill=255, font=_font(size)
            )
        out[index] = np.asarray(canvas, dtype=np.uint8)
    return out
