"""The job page's pictures as PNG, drawn from the spool with the code that draws the Secondary Captures.

Three pictures per image, on the source's own pixel grid so they line up under a
slider: the original as displayed, the rationale tinted over it, and the healthy
image (the original minus the rationale). As in the SCs, a negative prediction or
an image unlike the training data gets no colour and no healthy image
(``NoRationale`` says why). Rendered PNGs are kept in a small in-memory cache keyed
by the result file's modification time, so a re-run shows its new pictures.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from node.artefacts import RESULT_FILE, ImageResult, JobResult, job_dir, load_array, read_job_result
from node.results import overlay
from node.results.source_header import quiet_pydicom

KINDS = ("original", "overlay", "healthy")
MAX_SIDE = 1024  # a browser scales down anyway; larger PNGs only cost time


class NoRationale(LookupError):
    """This image has no rationale picture; the message says why in the overlay's words."""


def image_of(result: JobResult, key: str) -> ImageResult:
    for image in result.images:
        if image.key == key:
            return image
    raise LookupError(f"job {result.job_id} has no image {key!r}")


def render_png(results_root: Path, job_id: str, key: str, kind: str) -> bytes:
    """One picture as PNG bytes. Raises FileNotFoundError (no result yet), LookupError, NoRationale."""
    if kind not in KINDS:
        raise LookupError(f"unknown picture {kind!r}; expected one of {KINDS}")
    stamp = (job_dir(results_root, job_id) / RESULT_FILE).stat().st_mtime_ns
    return _cached_png(str(results_root), job_id, key, kind, stamp)


@functools.lru_cache(maxsize=48)
def _cached_png(results_root: str, job_id: str, key: str, kind: str, _stamp: int) -> bytes:
    root = Path(results_root)
    result = read_job_result(root, job_id)
    image = image_of(result, key)
    caption = overlay.Caption.for_image(result.model, image)
    if kind != "original" and not caption.shows_rationale:
        raise NoRationale(caption.no_rationale_reason)
    with quiet_pydicom():
        base = overlay.display_image(pydicom.dcmread(image.source_path))
    if kind == "original":
        return _png(base)
    rationale = load_array(root, job_id, key, "rationale")
    if kind == "overlay":
        return _png(overlay.blend(base, rationale, caption.rationale_scale))
    return _png(overlay.healthy_image(base, rationale))


def _png(pixels: np.ndarray) -> bytes:
    """uint8, or [0, 1] floats (grey or RGB) to PNG, at most MAX_SIDE pixels a side."""
    if pixels.dtype != np.uint8:
        pixels = np.rint(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)
    picture = Image.fromarray(pixels)
    if max(picture.size) > MAX_SIDE:
        picture.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)  # level 1: a fraction of the time of 6, a little larger
    return buffer.getvalue()
