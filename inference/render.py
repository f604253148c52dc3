"""The files of ``gvr explain``: PNGs at the source's own resolution, the cine as a GIF, raw maps.

The drawing itself is the delivery code's (``node.results.overlay``), so the
pictures a user sees offline are the ones the PACS receives (a negative gets the
grey overlay only); this module only writes files: greyscale and RGB PNGs, an
animated GIF that plays the model's decodings from the image to its healthy
version and back, and the model-resolution maps as ``.npy`` for tools that
score them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from node.results.overlay import Caption, healthy_image, render_cine, render_overlay, render_side_by_side

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
    """The pictures of one image in ``folder``; returns the paths written.

    Always ``input.png`` (the source as displayed), ``reconstruction.png`` (the
    model's decoding, upsampled), ``healthy.png`` (the source minus the
    rationale, ``healthy_image``) and ``rationale.png`` (the overlay SC's
    pixels); when the overlay shows a rationale also ``side-by-side.png`` and
    ``cine.gif``, as the PACS gets them. ``base`` is the source as displayed
    ([0, 1], source grid); ``maps`` holds the artefact arrays of
    ``node.artefacts`` (reconstruction, rationale on the source grid; cine in
    model space).
    """
    folder.mkdir(parents=True, exist_ok=True)
    healthy = healthy_image(base, maps["rationale"])
    written = [
        write_png(base, folder / "input.png"),
        write_png(maps["reconstruction"], folder / "reconstruction.png"),
        write_png(healthy, folder / "healthy.png"),
        write_png(render_overlay(base, maps["rationale"], caption), folder / "rationale.png"),
    ]
    if caption.shows_rationale:
        written.append(write_png(render_side_by_side(base, healthy, caption), folder / "side-by-side.png"))
        written.append(write_gif(render_cine(maps["cine"], caption, min_size=256), folder / "cine.gif"))
    return written


def write_model_maps(folder: Path, rationale: np.ndarray, counterfactual: np.ndarray) -> list[Path]:
    """``rationale.npy`` and ``healthy.npy``: float32 ``R x R`` in model space, for other tools to score.

    ``rationale`` is ``G(z0) - G(z*)`` (positive = speaks for disease, in [-2, 2]),
    ``counterfactual`` the model image with the disease removed (in [-1, 1]).
    """
    if rationale.shape != counterfactual.shape or rationale.ndim != 2:
        raise ValueError(f"rationale {rationale.shape} and healthy {counterfactual.shape} must be one R x R")
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, array in (("rationale", rationale), ("healthy", counterfactual)):
        path = folder / f"{name}.npy"
        np.save(path, np.asarray(array, dtype=np.float32), allow_pickle=False)
        written.append(path)
    return written
