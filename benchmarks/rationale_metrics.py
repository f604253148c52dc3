"""Metrics of the rationale benchmark that a fixed template cannot pass, with bootstrap CIs.

Why these: the old localisation scores (pointing game, energy in the union of
masks) reward a map that always highlights the heart and lung bases, whatever
the image. Each metric here compares a map with something *of this image*:

* fidelity: Pearson correlation of the signed map with ``x - twin`` (what the
  disease added to this image), over the whole image and inside lungs + heart;
* closer to twin (counterfactual methods only): ``1 - MAE(cf, twin) / MAE(x, twin)``
  inside lungs + heart, how much of the way to the true healthy image the
  counterfactual went;
* specificity: correlation of each map with the mean map of the *other* images
  of the same method (median; lower is better: a template scores 1);
* own-mask advantage: share of |map| energy in the image's own signs' masks
  minus the share in the masks of another positive with a different set of
  signs (a template scores about 0);
* per sign: pointing (the maximum of the map's positive part inside that sign's
  mask, the other signs' pixels left out) and the positive energy's share in it,
  over the images showing the sign; effusion side: for one-sided effusions, more
  positive energy where the effusion is than at the same place on the other
  side (reported per side: a map that always picks one side scores 1 and 0);
* validity (p* below the decision threshold) and proximity (mean |x - cf| in
  display units, [0, 1]) for the counterfactual methods.

Every method, the image-independent baselines included, goes through
:func:`per_image`; :func:`summarise` adds a bootstrap 95% CI (images resampled).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.rationale_data import PhantomSet

BOOTSTRAP_REPS = 1000
BOOTSTRAP_SEED = 0
# metric -> (statistic, higher is better); the statistic is what the tables show
STATISTICS: dict[str, tuple[str, bool]] = {
    "fidelity": ("median", True), "fidelity_organs": ("median", True), "closer_to_twin": ("mean", True),
    "specificity": ("median", False), "own_mask_advantage": ("mean", True),
    "validity": ("mean", True), "proximity": ("mean", False),
    "effusion_side": ("mean", True), "effusion_side_right": ("mean", True), "effusion_side_left": ("mean", True),
}


def correlation(a: np.ndarray, b: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """Per-image Pearson correlation of ``a`` and ``b`` (N x R x R), optionally within ``region``.

    A constant map has no correlation with anything: 0 (not NaN), so an empty map scores as chance.
    """
    out = np.zeros(len(a))
    for i in range(len(a)):
        u, v = (a[i][region[i]], b[i][region[i]]) if region is not None else (a[i].ravel(), b[i].ravel())
        u, v = u - u.mean(), v - v.mean()
        denominator = np.sqrt((u * u).sum() * (v * v).sum())
        out[i] = float((u * v).sum() / denominator) if denominator > 1e-12 else 0.0
    return out


def leave_one_out_mean(maps: np.ndarray) -> np.ndarray:
    """For each image, the mean of the *other* images' maps (the template its own method implies)."""
    n = len(maps)
    if n < 2:
        return np.zeros_like(maps)
    total = maps.sum(0, keepdims=True, dtype=np.float64)
    out: np.ndarray = ((total - maps) / (n - 1)).astype(np.float32)
    return out


def specificity(maps: np.ndarray) -> np.ndarray:
    """Per image: correlation with the mean map of the others (1 for a template)."""
    return correlation(maps, leave_one_out_mean(maps))


def closer_to_twin(counterfactual: np.ndarray, data: PhantomSet) -> np.ndarray:
    """Per image: ``1 - MAE(cf, twin) / MAE(x, twin)`` inside lungs + heart (NaN where x == twin there)."""
    out = np.full(len(data), np.nan)
    for i in range(len(data)):
        region = data.organs[i]
        before = np.abs(data.x[i] - data.twins[i])[region].mean()
        if before > 1e-6:
            out[i] = 1.0 - np.abs(counterfactual[i] - data.twins[i])[region].mean() / before
    return out


def sign_sets(data: PhantomSet) -> list[frozenset[str]]:
    return [frozenset(k for k, v in data.severities.items() if v[i] > 0) for i in range(len(data))]


def partners(data: PhantomSet) -> np.ndarray:
    """For each image, the next image (cyclically) with a different set of signs; -1 if none."""
    sets = sign_sets(data)
    n = len(sets)
    out = np.full(n, -1)
    for i in range(n):
        for step in range(1, n):
            j = (i + step) % n
            if sets[j] != sets[i] and sets[j]:
                out[i] = j
                break
    return out


def energy_share(weights: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image: share of ``weights`` (non-negative) inside ``masks`` (0 for an all-zero map)."""
    total = weights.reshape(len(weights), -1).sum(1)
    inside = (weights * masks).reshape(len(weights), -1).sum(1)
    return np.where(total > 0, inside / np.where(total > 0, total, 1.0), 0.0)


def own_mask_advantage(maps: np.ndarray, data: PhantomSet, partner: np.ndarray) -> np.ndarray:
    """Per image (those with a partner): |map| share in its own masks minus share in the partner's."""
    magnitude, union = np.abs(maps), data.union
    has = partner >= 0
    own = energy_share(magnitude[has], union[has])
    other = energy_share(magnitude[has], union[partner[has]])
    advantage: np.ndarray = own - other
    return advantage


def pointing(weights: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image: 1.0 if the maximum of ``weights`` (> 0) lies in ``masks``, else 0.0."""
    flat, where = weights.reshape(len(weights), -1), masks.reshape(len(masks), -1)
    best = flat.argmax(1)
    return np.array([float(flat[i, b] > 0 and where[i, b]) for i, b in enumerate(best)])


def per_sign(maps: np.ndarray, data: PhantomSet) -> dict[str, np.ndarray]:
    """``pointing_<sign>`` and ``energy_<sign>`` over the images that show the sign (positive part).

    The *other* signs' pixels are left out (a map may rightly peak on a bigger
    heart when the question is the effusion): what is asked is whether, among
    the pixels that are this sign or no sign, the map's maximum (its energy)
    falls on this sign. The exact ``x - twin`` scores 1 on pointing.
    """
    positive = np.clip(maps, 0.0, None)
    out: dict[str, np.ndarray] = {}
    for sign, masks in data.signs.items():
        present = data.severities[sign] > 0
        others = np.logical_or.reduce([m for name, m in data.signs.items() if name != sign])
        considered = (masks | ~others)[present]
        weights = positive[present] * considered
        out[f"pointing_{sign}"] = pointing(weights, masks[present])
        out[f"energy_{sign}"] = energy_share(weights, masks[present])
    return out


def effusion_side(maps: np.ndarray, data: PhantomSet) -> dict[str, np.ndarray]:
    """One-sided effusions: more positive energy where the effusion is than at the mirror place?

    Zones: :func:`benchmarks.rationale_data.effusion_zones` (the exact ``x - twin`` scores 1).

    ``effusion_side`` (correct, all one-sided effusions) and ``effusion_side_right``/``_left``
    (correct on the patient's right-/left-sided ones: a map that always picks one side scores 1 and 0).
    """
    positive = np.clip(maps, 0.0, None)
    right, left = data.effusion_sides[:, 0] > 0, data.effusion_sides[:, 1] > 0
    energy = np.einsum("nrc,nzrc->nz", positive, data.zones.astype(positive.dtype))  # N x (right, left)
    picks_right = energy[:, 0] > energy[:, 1]
    picks_left = energy[:, 1] > energy[:, 0]
    only_right, only_left = right & ~left, left & ~right
    correct = np.where(only_right, picks_right, picks_left)
    return {"effusion_side": correct[only_right | only_left].astype(float),
            "effusion_side_right": picks_right[only_right].astype(float),
            "effusion_side_left": picks_left[only_left].astype(float)}


def per_image(maps: np.ndarray, data: PhantomSet, partner: np.ndarray, counterfactual: np.ndarray | None = None,
              p_star: np.ndarray | None = None, threshold: float | None = None) -> dict[str, np.ndarray]:
    """Every metric's per-image values for one method's maps (N x R x R, signed, positive = disease)."""
    if maps.shape != data.twins.shape:
        raise ValueError(f"maps must be {data.twins.shape}, got {maps.shape}")
    maps = np.nan_to_num(maps.astype(np.float64))
    difference = data.difference
    out = {"fidelity": correlation(maps, difference), "fidelity_organs": correlation(maps, difference, data.organs),
           "specificity": specificity(maps), "own_mask_advantage": own_mask_advantage(maps, data, partner),
           **per_sign(maps, data), **effusion_side(maps, data)}
    if counterfactual is not None:
        out["closer_to_twin"] = closer_to_twin(counterfactual, data)
        out["proximity"] = np.abs(data.x - counterfactual).reshape(len(data), -1).mean(1) / 2.0
    if p_star is not None and threshold is not None:
        out["validity"] = (p_star < threshold).astype(float)
    return out


def bootstrap_ci(values: np.ndarray, statistic: str = "mean", reps: int = BOOTSTRAP_REPS,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(estimate, 2.5%, 97.5%) of ``statistic`` over ``values`` with the images resampled (NaNs dropped)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return (float("nan"),) * 3
    reduce: Callable[..., Any] = np.median if statistic == "median" else np.mean
    rng = np.random.default_rng(seed)
    samples = reduce(values[rng.integers(0, len(values), (reps, len(values)))], axis=1)
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(reduce(values)), float(low), float(high)


def summarise(values: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """metric -> {value, low, high, n, statistic}; per-sign metrics are means."""
    out = {}
    for name, array in values.items():
        statistic = STATISTICS.get(name, ("mean", True))[0]
        value, low, high = bootstrap_ci(array, statistic)
        out[name] = {"value": value, "low": low, "high": high, "n": int(np.isfinite(array).sum()),
                     "statistic": statistic}
    return out
