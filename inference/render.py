"""The pictures of ``gvr explain``: PNGs at the source's own resolution and the cine as a GIF.

The drawing itself is the delivery code's (``node.results.overlay``), so the
overlay a user sees offline is the one the PACS receives; this module only
writes files: greyscale and RGB PNGs, and an animated GIF that plays from the
original decoding to the healthy one and back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from node.results.overlay import Caption, render_cine, render_overlay

GIF_FRAME_MS = 120
GIF_END_PAUSE_MS = 600


def _uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    scaled: np.ndarray = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return scaled


def write_png(image: np.ndarray, path: Path) -> Path:
    """Save ``rows x cols`` (grey; float in [0, 1] or uint8) or ``rows x cols x 3`` (RGB uint8)."""
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"write_png expects rows x cols or rows x cols x 3, got shape {image.shape}")
    Image.fromarray(_uint8(image)).save(path, optimize=True)
    return path


def write_gif(frames: np.ndarray, path: Path, frame_ms: int = GIF_FRAME_MS) -> Path:
    """An endless GIF over ``F x rows x cols`` uint8 frames, forward then back, pausing at both ends."""
    if frames.ndim != 3 or frames.shape[0] < 2:
        raise ValueError(f"write_gif expects [frames >= 2, rows, cols], got shape {frames.shape}")
    order = list(range(frames.shape[0])) + list(range(frames.shape[0] - 2, 0, -1))
    images = [Image.fromarray(_uint8(frames[i])) for i in order]
    durations = [GIF_END_PAUSE_MS if i in (0, frames.shape[0] - 1) else frame_ms for i in order]
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0, optimize=False)
    return path


def write_pictures(folder: Path, base: np.ndarray, maps: dict[str, np.ndarray], caption: Caption) -> list[Path]:
    """input.png, reconstruction.png, healthy.png, rationale.png (overlay) and cine.gif in ``folder``.

    ``base`` is the source as displayed ([0, 1], source grid); ``maps`` holds the
    artefact arrays of ``node.artefacts`` (reconstruction, healthy, rationale on
    the source grid; cine in model space).
    """
    folder.mkdir(parents=True, exist_ok=True)
    return [
        write_png(base, folder / "input.png"),
        write_png(maps["reconstruction"], folder / "reconstruction.png"),
        write_png(maps["healthy"], folder / "healthy.png"),
        write_png(render_overlay(base, maps["rationale"], caption), folder / "rationale.png"),
        write_gif(render_cine(maps["cine"], caption, min_size=256), folder / "cine.gif"),
    ]
