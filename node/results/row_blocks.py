"""Element-wise pixel arithmetic a block of rows at a time, into one small scratch array.

At 3000 px a float32 image is 36 MB: each numpy step over a whole temporary allocates it
(the kernel faults in every page) and streams it through memory again. Done on blocks of
~256K values, the same steps run in a scratch array that stays in the cache, and only the
8-bit result is full size: a third of the time. Every value is computed by the same float
operations in the same order as on the whole array, so the results are identical
(tests/node/test_overlay_arrays.py compares them with the whole-array formulae).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

BLOCK_VALUES = 1 << 18  # 1 MB of float32 scratch


def block_rows(rows: int, columns: int) -> int:
    """Rows per block: ~BLOCK_VALUES values, at least one row, at most ``rows``."""
    return max(1, min(rows, BLOCK_VALUES // max(columns, 1)))


def blocks(rows: int, columns: int) -> Iterator[slice]:
    """Row slices of ``block_rows`` rows covering ``rows`` rows of ``columns`` values."""
    step = block_rows(rows, columns)
    for top in range(0, rows, step):
        yield slice(top, min(top + step, rows))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """``rint(clip(image, 0, 1) * 255)`` as uint8, in the arithmetic (float32 or float64) numpy picks for ``image``."""
    out = np.empty(image.shape, dtype=np.uint8)
    if image.ndim < 2:
        out[...] = _scaled(np.clip(image, 0.0, 1.0))
        return out
    columns = int(np.prod(image.shape[1:]))
    scratch = np.empty((block_rows(image.shape[0], columns), *image.shape[1:]),
                       dtype=np.clip(image[:1], 0.0, 1.0).dtype)  # fmt: skip
    for rows in blocks(image.shape[0], columns):
        part = scratch[: rows.stop - rows.start]
        np.clip(image[rows], 0.0, 1.0, out=part)
        out[rows] = _scaled(part)
    return out


def _scaled(values: np.ndarray) -> np.ndarray:
    """``rint(values * 255)`` in place (values in [0, 1])."""
    values *= 255.0
    np.rint(values, out=values)
    return values


def difference_to_uint8(base: np.ndarray, rationale: np.ndarray) -> np.ndarray:
    """``to_uint8(clip(base - rationale, 0, 1))`` for float32 images of one shape (the healthy image)."""
    if base.dtype != np.float32 or rationale.dtype != np.float32 or base.shape != rationale.shape or base.ndim != 2:
        raise ValueError(f"expected two float32 images of one shape, got {base.dtype} {base.shape} and "
                         f"{rationale.dtype} {rationale.shape}")  # fmt: skip
    out = np.empty(base.shape, dtype=np.uint8)
    scratch = np.empty((block_rows(*base.shape), base.shape[1]), dtype=np.float32)
    for rows in blocks(*base.shape):
        part = scratch[: rows.stop - rows.start]
        np.subtract(base[rows], rationale[rows], out=part)
        np.clip(part, 0.0, 1.0, out=part)
        out[rows] = _scaled(part)
    return out


def tint_index(rationale: np.ndarray, scale: float) -> np.ndarray:
    """``uint8(clip(rationale * (127.5 / scale) + 128, 0, 255))`` (float32): t = rationale / scale on 0..255."""
    out = np.empty(rationale.shape, dtype=np.uint8)
    for rows, index in _tint_blocks(rationale, scale):
        out[rows] = index
    return out


def tinted(rationale: np.ndarray, scale: float, untinted: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Where ``tint_index`` lies outside ``untinted`` (lowest, highest): flat positions, and the index there.

    ``np.flatnonzero`` of the full-size comparison, and ``tint_index`` at those positions,
    without the full-size index and mask (most of a chest is untinted).
    """
    low, high = untinted
    positions, picked = [], []
    for rows, index in _tint_blocks(rationale, scale):
        found = np.flatnonzero((index < low) | (index > high))
        picked.append(index.ravel()[found])
        positions.append(found + rows.start * rationale.shape[1])
    if not positions:
        return np.empty(0, dtype=np.intp), np.empty(0, dtype=np.uint8)
    return np.concatenate(positions), np.concatenate(picked)


def _tint_blocks(rationale: np.ndarray, scale: float) -> Iterator[tuple[slice, np.ndarray]]:
    """``tint_index`` a block of rows at a time: (rows, their index values; valid until the next block)."""
    if rationale.ndim != 2:
        raise ValueError(f"expected a 2-D rationale, got shape {rationale.shape}")
    scratch = np.empty((block_rows(*rationale.shape), rationale.shape[1]),
                       dtype=np.result_type(rationale.dtype, np.float32))  # fmt: skip
    index = np.empty(scratch.shape, dtype=np.uint8)
    for rows in blocks(*rationale.shape):
        part, values = scratch[: rows.stop - rows.start], index[: rows.stop - rows.start]
        np.multiply(rationale[rows], np.float32(127.5 / scale), out=part)
        part += np.float32(128.0)
        values[...] = np.clip(part, 0, 255, out=part)
        yield rows, values


def display(
    values: np.ndarray, rescale: tuple[float, float], window: tuple[float, float] | None, invert: bool
) -> np.ndarray:
    """Stored values to the display image (float32 in [0, 1]): ``overlay.display_image``'s usual case.

    ``rescale`` (slope, intercept) is the Modality LUT (skipped where 1, 0), ``window`` (centre,
    width) a LINEAR VOI window (PS3.3 C.11.2.1.2.1) or None; then the range found is scaled to
    [0, 1] and, for MONOCHROME1, inverted. Two passes over the image, each a block at a time.
    """
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {values.shape}")
    out = np.empty(values.shape, dtype=np.float32)
    low, high = np.inf, -np.inf
    for rows in blocks(*values.shape):
        part = out[rows]
        part[...] = values[rows]
        _modality_and_window(part, rescale, window)
        low, high = min(low, float(part.min())), max(high, float(part.max()))
    for rows in blocks(*values.shape):
        part = out[rows]
        if high > low:
            part -= np.float32(low)
            part *= np.float32(1.0 / (high - low))
        else:
            part[...] = 0.0
        if invert:
            np.subtract(np.float32(1.0), part, out=part)
    return out


def _modality_and_window(part: np.ndarray, rescale: tuple[float, float], window: tuple[float, float] | None) -> None:
    slope, intercept = rescale
    if slope != 1.0:
        part *= np.float32(slope)
    if intercept != 0.0:
        part += np.float32(intercept)
    if window is None:
        return
    centre, width = window[0], max(window[1], 1.0)
    if width == 1.0:
        part[...] = part >= np.float32(centre - 0.5)
        return
    part -= np.float32(centre - 0.5)
    part *= np.float32(1.0 / (width - 1.0))
    part += np.float32(0.5)
    np.clip(part, 0.0, 1.0, out=part)
