"""Assemble a model bundle from the three training folders (and an evaluation report).

Weights are copied byte for byte (they are already safetensors), their sha256
recorded, and ``manifest.json`` written last, under a temporary name and then
renamed, so a half-exported folder is never a loadable bundle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from inference.bundle import MANIFEST_FILE, BundleManifest, WeightsFile, sha256_of
from inference.models import ArchitectureConfig, ClassifierConfig
from inference.preprocess import MIN_SIDE
from training.progress import read_state

logger = logging.getLogger(__name__)

PREPROCESSING: dict[str, Any] = {
    "function": "inference.preprocess.dicom_to_model_image",
    "steps": ["modality LUT", "VOI LUT or window when present", "MONOCHROME1 inverted", "min-max to [0, 1]",
              "pixel spacing / aspect ratio made square", "centred zero padding to a square",
              "PIL bilinear (antialiased) resize", "scaled to [-1, 1]"],
    "min_side": MIN_SIDE,
    "range": [-1.0, 1.0],
}


def _metrics(evaluation: dict[str, Any] | None, classifier_state: dict[str, Any]) -> dict[str, Any]:
    if evaluation is not None:
        keys = ("n", "positives", "auc", "auc_ci95", "sensitivity", "specificity", "brier", "reconstruction_mae",
                "reconstruction_ssim")
        metrics = {"source": "held-out evaluation", **{k: evaluation[k] for k in keys if k in evaluation}}
        if "signs" in evaluation:
            metrics["auc_without_cardiomegaly"] = evaluation["signs"]["without_cardiomegaly"]["auc"]
        if "pixel_baseline" in evaluation:
            metrics["pixel_baseline_auc"] = evaluation["pixel_baseline"]["auc"]
        return metrics
    best = classifier_state["classifier"]
    return {"source": "classifier validation split", "auc": best["val_auc"], "n": best["n_val"]}


def export_bundle(generator_dir: Path, encoder_dir: Path, classifier_dir: Path, out: Path, name: str,
                  version: str, evaluation: dict[str, Any] | None = None) -> BundleManifest:
    """Write a bundle to ``out`` and return its (validated) manifest."""
    g_state, e_state, c_state = read_state(generator_dir), read_state(encoder_dir), read_state(classifier_dir)
    architecture = ArchitectureConfig.from_dict(e_state["architecture"])
    g_arch = ArchitectureConfig.from_dict(g_state["config"]["architecture"])
    if g_arch.latent_dim != architecture.latent_dim or g_arch.resolution != architecture.resolution:
        raise ValueError(f"encoder in {encoder_dir} was trained for another generator than {generator_dir}")
    sources = {"generator": generator_dir / "generator.safetensors", "encoder": encoder_dir / "encoder.safetensors",
               "classifier": classifier_dir / "classifier.safetensors"}
    if "overfit_classifier" in c_state:
        sources["overfit_classifier"] = classifier_dir / "overfit_classifier.safetensors"
    out.mkdir(parents=True, exist_ok=True)
    weights = {}
    for role, source in sources.items():
        target = out / f"{role}.safetensors"
        shutil.copyfile(source, target)
        weights[role] = WeightsFile(target.name, sha256_of(target))
    recon = (evaluation or {}).get("reconstruction_error") or e_state["reconstruction_error"]
    manifest = BundleManifest(
        name=name, version=version, created=datetime.now(UTC).replace(microsecond=0).isoformat(),
        architecture=architecture, classifier=ClassifierConfig.from_dict(c_state["classifier"]["config"]),
        overfit_classifier=(ClassifierConfig.from_dict(c_state["overfit_classifier"]["config"])
                            if "overfit_classifier" in c_state else None),
        decision_threshold=float(c_state["classifier"]["decision_threshold"]),
        bnp_threshold=float(c_state["bnp_threshold"]), reconstruction_error=recon, weights=weights,
        preprocessing=PREPROCESSING,
        training_data={"generator": g_state.get("data", ""), "generator_steps": g_state["step"],
                       "encoder_steps": e_state["step"], "classifier": c_state.get("data", ""),
                       "evaluation": (evaluation or {}).get("data", "")},
        metrics=_metrics(evaluation, c_state),
        display=({"rationale_scale": float(evaluation["rationale_scale"])}
                 if evaluation and "rationale_scale" in evaluation else {}),
    )
    tmp = out / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    os.replace(tmp, out / MANIFEST_FILE)
    logger.info("exported bundle %s %s to %s", name, version, out)
    return manifest
