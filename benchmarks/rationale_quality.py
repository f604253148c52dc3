"""The rationale-quality benchmark: every method, side by side in one run, on held-out phantoms with twins.

Why the image-independent baselines: a map that is the same for every image
(the mean GVR map of the *other* images, the mean positive mask of the others,
the mean true difference of the others) or nearly so (IntegratedGradients
blurred to a blob) can score well on "is the map where signs usually are". The
benchmark is only worth something if such maps lose on it: they go through the
same metric code as GVR, Latent Shift and captum, and the tables show them.

Methods, all on the held-out phantoms with at least one sign that the
classifier calls positive: GVR, Latent Shift, captum (Saliency,
IntegratedGradients, Occlusion, LayerGradCam), the templates above, a random
map (chance), the exact ``x - twin`` (the ceiling), and the paper's control, GVR
through the deliberately overfitted classifier on the same images.

The sweeps of lambda and of the other settings (``benchmarks.rationale_sweep``)
run GVR alone on *validation* seeds, never the test seeds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from benchmarks.rationale_data import PhantomSet, load_phantoms
from benchmarks.rationale_metrics import leave_one_out_mean, partners, per_image, summarise
from inference.bundle import Bundle
from inference.rationale import Explainer, RationaleConfig, explain

logger = logging.getLogger(__name__)

BATCH = 16
BLUR_FRACTION = 1 / 16  # Gaussian sigma of the blurred IntegratedGradients, as a share of the side
MIN_VALIDITY = 0.95  # a lambda whose counterfactuals fail more often than this is not a candidate
FIGURE_ROWS = 6
TEMPLATES = ("Mean GVR map (other images)", "Mean positive mask (other images)",
             "Mean x - twin (other images)", "Blurred IntegratedGradients")


@dataclass
class MethodMaps:
    """One method's output on the benchmark images; ``counterfactual`` and ``p_star`` only for the
    counterfactual methods. ``kind``: method, template, reference or control (for the tables)."""

    name: str
    maps: np.ndarray
    seconds_per_image: float
    kind: str = "method"
    counterfactual: np.ndarray | None = None
    p_star: np.ndarray | None = None
    steps: np.ndarray | None = None


def classifier_positives(bundle: Bundle, data: PhantomSet) -> tuple[PhantomSet, np.ndarray]:
    """(the phantoms with a sign that the classifier calls positive, p0 of every phantom)."""
    with torch.no_grad():
        p0 = np.concatenate([bundle.classifier.predict_proba(bundle.encoder.encode(data.images[i:i + 64])).numpy()
                             for i in range(0, len(data), 64)])
    chosen = (p0 >= bundle.manifest.decision_threshold) & data.union.reshape(len(data), -1).any(1)
    return data.subset(chosen), p0


def run_gvr(bundle: Bundle, images: torch.Tensor, config: RationaleConfig, name: str = "GVR",
            kind: str = "method") -> MethodMaps:
    """GVR in batches of 16, keeping the counterfactual, p* and steps of every image."""
    start = time.perf_counter()
    parts = [explain(bundle, images[i:i + BATCH], config) for i in range(0, len(images), BATCH)]
    seconds = (time.perf_counter() - start) / max(1, len(images))
    return MethodMaps(name, np.concatenate([p.rationale for p in parts]), seconds, kind,
                      counterfactual=np.concatenate([p.counterfactual for p in parts]),
                      p_star=np.concatenate([p.p_star for p in parts]),
                      steps=np.concatenate([p.steps for p in parts]))


def run_explainer(name: str, explainer: Explainer, images: torch.Tensor) -> MethodMaps:
    start, maps = time.perf_counter(), []
    for i in range(0, len(images), BATCH):
        maps.append(explainer(images[i:i + BATCH]).detach().cpu().numpy().astype(np.float32))
    return MethodMaps(name, np.concatenate(maps), (time.perf_counter() - start) / max(1, len(images)))


def blurred(maps: np.ndarray, fraction: float = BLUR_FRACTION) -> np.ndarray:
    """Each map blurred with a Gaussian of sigma ``fraction`` of the side (image-dependent only coarsely)."""
    from scipy.ndimage import gaussian_filter

    sigma = max(1.0, fraction * maps.shape[-1])
    return np.stack([gaussian_filter(m.astype(np.float64), sigma, mode="nearest") for m in maps]).astype(np.float32)


def templates(gvr: MethodMaps, ig: MethodMaps | None, data: PhantomSet) -> list[MethodMaps]:
    """The image-independent baselines, each leave-one-out over the benchmark images."""
    rows = [MethodMaps(TEMPLATES[0], leave_one_out_mean(gvr.maps), gvr.seconds_per_image, "template"),
            MethodMaps(TEMPLATES[1], leave_one_out_mean(data.union.astype(np.float32)), 0.0, "template"),
            MethodMaps(TEMPLATES[2], leave_one_out_mean(data.difference), 0.0, "template")]
    if ig is not None:
        rows.append(MethodMaps(TEMPLATES[3], blurred(ig.maps), ig.seconds_per_image, "template"))
    return rows


def latent_shift(bundle: Bundle, images: torch.Tensor, config: RationaleConfig) -> MethodMaps:
    """Latent Shift; its counterfactual is the image minus the map, like GVR's."""
    from benchmarks.rationale_baselines import LatentShiftExplainer

    explainer = LatentShiftExplainer(bundle, config.target)
    out = run_explainer("LatentShift", explainer, images)
    out.counterfactual = np.clip(images[:, 0].numpy() - out.maps, -1.0, 1.0)
    out.p_star = np.concatenate(explainer.p_star)
    return out


def overfit_control(bundle: Bundle, images: torch.Tensor, config: RationaleConfig) -> MethodMaps | None:
    """GVR through the overfitted classifier on the same images (the paper's control)."""
    if bundle.overfit_classifier is None:
        logger.warning("bundle has no overfit_classifier: the control row is skipped")
        return None
    target = config.target_for(bundle.manifest.decision_threshold)
    control = replace(bundle, classifier=bundle.overfit_classifier)
    return run_gvr(control, images, replace(config, target=target), "GVR, overfitted classifier (control)",
                   "control")


def run_all(bundle: Bundle, data: PhantomSet, config: RationaleConfig,
            methods: tuple[str, ...] | None = None) -> list[MethodMaps]:
    """Every method's maps on ``data`` (already the positives); ``methods`` limits the captum ones."""
    from benchmarks.rationale_baselines import captum_explainers

    images = data.images
    gvr = run_gvr(bundle, images, config)
    assert gvr.steps is not None
    logger.info("GVR: %.3f s / image, mean steps %.1f", gvr.seconds_per_image, float(gvr.steps.mean()))
    results = [gvr, latent_shift(bundle, images, config)]
    for name, explainer in captum_explainers(bundle).items():
        if methods is None or name in methods:
            results.append(run_explainer(name, explainer, images))
            logger.info("%s: %.3f s / image", name, results[-1].seconds_per_image)
    ig = next((r for r in results if r.name == "IntegratedGradients"), None)
    results.extend(templates(gvr, ig, data))
    rng = np.random.default_rng(0)
    results.append(MethodMaps("Random (chance)", rng.standard_normal(data.twins.shape).astype(np.float32), 0.0,
                              "reference"))
    results.append(MethodMaps("x - twin (ceiling)", data.difference, 0.0, "reference",
                              counterfactual=data.twins.copy()))
    control = overfit_control(bundle, images, config)
    if control is not None:
        results.append(control)
    return results


def score(results: list[MethodMaps], data: PhantomSet, threshold: float) -> list[dict[str, Any]]:
    """One row per method: metric -> {value, low, high, n, statistic}, plus timing and steps."""
    partner = partners(data)
    rows = []
    for r in results:
        values = per_image(r.maps, data, partner, r.counterfactual, r.p_star, threshold)
        row: dict[str, Any] = {"method": r.name, "kind": r.kind, "n": len(data),
                               "seconds_per_image": r.seconds_per_image, "metrics": summarise(values)}
        if r.steps is not None:
            row["mean_steps"] = float(r.steps.mean())
        rows.append(row)
    return rows


def quality(bundle: Bundle, seeds: range, config: RationaleConfig,
            methods: tuple[str, ...] | None = None) -> tuple[dict[str, Any], PhantomSet, list[MethodMaps]]:
    """The benchmark: (report, the positives, every method's maps) on the phantoms ``seeds``."""
    data = load_phantoms(seeds, bundle.manifest.resolution)
    positives, _ = classifier_positives(bundle, data)
    threshold = bundle.manifest.decision_threshold
    with_sign = int(data.union.reshape(len(data), -1).any(1).sum())
    logger.info("%d of %d held-out phantoms show a sign; %d of those are called positive",
                with_sign, len(data), len(positives))
    if len(positives) < 3:
        raise ValueError(f"only {len(positives)} positives with a sign among seeds {seeds.start}-{seeds.stop - 1}")
    results = run_all(bundle, positives, config, methods)
    report = {"bundle": f"{bundle.manifest.name} {bundle.manifest.version}",
              "resolution": bundle.manifest.resolution, "seeds": f"{seeds.start}-{seeds.stop - 1}",
              "held_out": len(data), "with_sign": with_sign, "positives_with_sign": len(positives),
              "decision_threshold": threshold, "config": repr(config), "threads": torch.get_num_threads(),
              "rows": score(results, positives, threshold)}
    return report, positives, results

