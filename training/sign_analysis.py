"""Which signs a classifier uses, measured on phantoms whose true signs are known.

An AUC alone cannot tell a heart-failure model from a heart-size detector: on
phantoms where most positives have a big heart, both score well. This module
asks the questions that can: the AUC among phantoms *without* cardiomegaly;
the sensitivity per sign (all positives showing it, and positives where it is
the only sign); a linear regression of the model's logit on the true
severities (standardised coefficients: how much each sign moves the score);
and, beside the bundle, a trivial baseline that any "explanation" must beat:
logistic regression on 8 x 8 average-pooled pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from training.evaluate import bootstrap_auc, roc_auc
from training.phantom_signs import SIGNS


def phantom_signs(seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(severities N x 4 in SIGNS order, ctr N) of phantoms ``seeds`` (drawn at 16 px: signs do not depend on size)."""
    from training.phantoms import make_phantom

    phantoms = [make_phantom(seed, 16) for seed in seeds]
    severities = np.array([[p.severities[name] for name in SIGNS] for p in phantoms], dtype=np.float64)
    return severities, np.array([p.ctr for p in phantoms], dtype=np.float64)


def seeds_of(names: tuple[str, ...]) -> list[int] | None:
    """Phantom seeds from ``LabelledImages.names`` (``phantom-<seed>``), or None for real images."""
    if not names or not all(name.startswith("phantom-") for name in names):
        return None
    return [int(name.removeprefix("phantom-")) for name in names]


def auc_with_ci(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    if labels.all() or not labels.any():
        return {"auc": None, "auc_ci95": None, "n": len(labels), "positives": int(labels.sum())}
    return {"auc": roc_auc(labels, scores), "auc_ci95": list(bootstrap_auc(labels, scores, 1000)),
            "n": len(labels), "positives": int(labels.sum())}


def sign_report(labels: np.ndarray, probabilities: np.ndarray, threshold: float,
                severities: np.ndarray) -> dict[str, Any]:
    """AUC without cardiomegaly, per-sign sensitivity, and the logit regressed on the true severities."""
    labels = np.asarray(labels, dtype=bool)
    present = severities > 0
    predicted = probabilities >= threshold
    report: dict[str, Any] = {"without_cardiomegaly": auc_with_ci(labels[~present[:, 0]],
                                                                 probabilities[~present[:, 0]])}
    sensitivity = {}
    for index, name in enumerate(SIGNS):
        with_sign = labels & present[:, index]
        alone = with_sign & (present.sum(axis=1) == 1)
        sensitivity[name] = {
            "positives_with_sign": int(with_sign.sum()),
            "sensitivity": float(predicted[with_sign].mean()) if with_sign.any() else None,
            "positives_with_only_this_sign": int(alone.sum()),
            "sensitivity_alone": float(predicted[alone].mean()) if alone.any() else None,
        }
    report["per_sign"] = sensitivity
    clipped = np.clip(probabilities, 1e-6, 1 - 1e-6)
    logit = np.log(clipped / (1 - clipped))
    design = (severities - severities.mean(axis=0)) / severities.std(axis=0).clip(1e-9)
    design = np.column_stack([np.ones(len(logit)), design])
    coefficients, *_ = np.linalg.lstsq(design, logit, rcond=None)
    fitted = design @ coefficients
    r2 = 1 - float(((logit - fitted) ** 2).sum() / ((logit - logit.mean()) ** 2).sum())
    report["logit_regression"] = {"standardised_coefficients": dict(zip(SIGNS, map(float, coefficients[1:]),
                                                                        strict=True)),
                                  "r2": r2}
    return report


def pooled_pixels(images: np.ndarray, cells: int = 8) -> np.ndarray:
    """uint8 model images N x R x R -> N x cells^2 features in [0, 1] (average pooling)."""
    n, r, _ = images.shape
    if r % cells:
        raise ValueError(f"resolution {r} is not a multiple of {cells}")
    block = r // cells
    pooled: np.ndarray = images.reshape(n, cells, block, cells, block).mean(axis=(2, 4)).reshape(n, -1) / 255.0
    return pooled


def pixel_baseline_auc(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                       test_labels: np.ndarray, cells: int = 8) -> dict[str, Any]:
    """AUC of logistic regression on ``cells x cells`` pooled pixels (trained on the labelled set), overall
    and on the test phantoms' subsets the caller cares about."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    model.fit(pooled_pixels(train_images, cells), np.asarray(train_labels, dtype=bool))
    scores = model.predict_proba(pooled_pixels(test_images, cells))[:, 1]
    return {"cells": cells, "scores": scores, **auc_with_ci(np.asarray(test_labels, dtype=bool), scores)}
