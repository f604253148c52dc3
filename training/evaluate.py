"""Held-out evaluation of a bundle: discrimination, operating point, calibration, reconstruction.

AUC is computed from ranks (the Mann-Whitney statistic, ties counted half),
with a percentile bootstrap 95% interval; sensitivity and specificity at the
bundle's decision threshold; a reliability diagram; and the distribution of
``mean |x - G(E(x))|``, whose percentiles become the bundle's
out-of-distribution reference.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.data import LabelledImages, to_tensor
from training.train_encoder import percentiles, reconstruction_errors

logger = logging.getLogger(__name__)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; raises ValueError when only one class is present."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes, got {n_pos} positive and {n_neg} negative")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    unique, inverse, counts = np.unique(sorted_scores, return_inverse=True, return_counts=True)
    if len(unique) < len(scores):  # average the ranks of ties
        mean_rank = np.bincount(inverse, weights=np.arange(1, len(scores) + 1)) / counts
        ranks[order] = mean_rank[inverse]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_auc(labels: np.ndarray, scores: np.ndarray, n: int = 2000,
                  seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the AUC (resamples with one class are skipped)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels).astype(bool)
    values = []
    for _ in range(n):
        idx = rng.integers(0, len(labels), len(labels))
        if labels[idx].all() or not labels[idx].any():
            continue
        values.append(roc_auc(labels[idx], scores[idx]))
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def youden_threshold(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The probability threshold maximising sensitivity + specificity - 1."""
    labels = np.asarray(labels).astype(bool)
    best, best_j = 0.5, -1.0
    for t in np.unique(probabilities):
        sens, spec = operating_point(labels, probabilities, float(t))
        if sens + spec - 1 > best_j:
            best, best_j = float(t), sens + spec - 1
    return best


def operating_point(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) of ``probability >= threshold``."""
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(probabilities) >= threshold
    sens = float((predicted & labels).sum() / max(labels.sum(), 1))
    spec = float((~predicted & ~labels).sum() / max((~labels).sum(), 1))
    return sens, spec


def calibration_bins(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    out = []
    for b in range(bins):
        mask = which == b
        if mask.any():
            out.append({"mean_predicted": float(probabilities[mask].mean()),
                        "observed_rate": float(np.asarray(labels)[mask].mean()), "count": int(mask.sum())})
    return out


def latents_of(encoder: torch.nn.Module, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """``E(x)`` for uint8 model images, without gradients."""
    device = next(encoder.parameters()).device
    with torch.no_grad():
        return torch.cat([encoder.encode(to_tensor(images[i:i + batch]).to(device)).cpu()  # type: ignore[operator]
                          for i in range(0, images.shape[0], batch)])


def _plots(out: Path, labels: np.ndarray, probabilities: np.ndarray, errors: np.ndarray,
           calibration: list[dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect")
    ax.plot([c["mean_predicted"] for c in calibration], [c["observed_rate"] for c in calibration], "o-",
            label="model")
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed rate of BNP >= threshold")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "calibration.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    ax.hist(errors, bins=40)
    ax.set_xlabel("mean |x - G(E(x))| (model space, [-1, 1])")
    ax.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(out / "reconstruction_error.png")
    plt.close(fig)


def evaluate_bundle(bundle: Any, data: LabelledImages, out: Path, bootstrap: int = 2000,
                    seed: int = 0, baseline: LabelledImages | None = None) -> dict[str, Any]:
    """Metrics of ``bundle`` on ``data``; writes report.json, calibration.png, reconstruction PNGs.

    On phantoms, also which signs the classifier uses (``training.sign_analysis``); with
    ``baseline`` (the labelled training set), the 8 x 8 pooled-pixel logistic regression's AUC.
    """
    from training.train_generator import write_grid

    out.mkdir(parents=True, exist_ok=True)
    labels = data.labels
    z = latents_of(bundle.encoder, data.images)
    with torch.no_grad():
        probabilities = bundle.classifier.predict_proba(z).numpy().astype(np.float64)
    threshold = bundle.manifest.decision_threshold
    auc = roc_auc(labels, probabilities)
    low, high = bootstrap_auc(labels, probabilities, bootstrap, seed)
    sens, spec = operating_point(labels, probabilities, threshold)
    calibration = calibration_bins(labels, probabilities)
    errors = reconstruction_errors(bundle.encoder, bundle.generator, data.images)
    report = {"n": len(labels), "positives": int(labels.sum()), "auc": auc, "auc_ci95": [low, high],
              "decision_threshold": threshold, "sensitivity": sens, "specificity": spec,
              "bnp_threshold": data.threshold, "calibration": calibration,
              "brier": float(np.mean((probabilities - labels) ** 2)),
              "reconstruction_mae": float(errors.mean()), "reconstruction_error": percentiles(errors)}
    report.update(_reconstruction_ssim(bundle, data.images))
    report.update(_sign_sections(data, probabilities, threshold, baseline))
    _plots(out, labels, probabilities, errors, calibration)
    with torch.no_grad():
        x = to_tensor(data.images[:16])
        recon = bundle.generator.decode(bundle.encoder.encode(x)).squeeze(1).numpy()
    write_grid([x.squeeze(1).numpy(), recon], out / "reconstructions.png", per_row=4)
    return report


def _sign_sections(data: LabelledImages, probabilities: np.ndarray, threshold: float,
                   baseline: LabelledImages | None) -> dict[str, Any]:
    from training.sign_analysis import auc_with_ci, phantom_signs, pixel_baseline_auc, seeds_of, sign_report

    sections: dict[str, Any] = {}
    seeds = seeds_of(data.names)
    severities = phantom_signs(seeds)[0] if seeds is not None else None
    if severities is not None:
        sections["signs"] = sign_report(data.labels, probabilities, threshold, severities)
    if baseline is not None:
        pixels = pixel_baseline_auc(baseline.images, baseline.labels, data.images, data.labels)
        scores = pixels.pop("scores")
        if severities is not None:
            keep = severities[:, 0] == 0
            pixels["without_cardiomegaly"] = auc_with_ci(data.labels[keep], scores[keep])
        sections["pixel_baseline"] = pixels
    return sections


def _reconstruction_ssim(bundle: Any, images: np.ndarray, batch: int = 128) -> dict[str, Any]:
    """SSIM(x, G(E(x))) at model resolution (data range 1): does the decoding keep the image's structure?"""
    from training.train_autoencoder import ssim

    values = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            x = to_tensor(images[i:i + batch])
            values.append(ssim(bundle.generator.decode(bundle.encoder.encode(x)), x))
    scores = torch.cat(values).numpy().astype(np.float64)
    return {"reconstruction_ssim": float(scores.mean()),
            "reconstruction_ssim_p5_p50_p95": [float(np.percentile(scores, q)) for q in (5, 50, 95)]}
