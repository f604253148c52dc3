"""From a list of model images to one explanation per image, in batches.

The worker and ``gvr explain`` both go through ``explain_images``: it stacks the
images, runs ``inference.rationale.explain`` a batch at a time on the bundle's
device, and hands back one plain record per image (numpy, model space), so the
callers never touch torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inference.bundle import Bundle, default_bundle_path, load_bundle
from inference.preprocess import Geometry
from inference.rationale import Rationale, RationaleConfig, explain


@dataclass(frozen=True)
class ImageExplanation:
    """One image's numbers and model-space maps (``R x R`` float32 in [-1, 1]; rationale in [-2, 2]).

    ``healthy`` is the model's decoding ``G(z*)``; ``counterfactual`` is the
    model image with the disease removed, ``clip(x - rationale)``: what a reader
    is shown as healthy (the patient's own image, not a decoding).
    """

    probability: float
    probability_healthy: float
    steps: int
    ood_score: float
    ood_flag: bool
    reconstruction: np.ndarray
    healthy: np.ndarray
    rationale: np.ndarray
    counterfactual: np.ndarray
    frames: np.ndarray  # F x R x R, from reconstruction to healthy

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0 or not 0.0 <= self.probability_healthy <= 1.0:
            raise ValueError(f"probabilities must lie in [0, 1], got {self.probability}, {self.probability_healthy}")
        if not self.rationale.shape == self.healthy.shape == self.counterfactual.shape or self.rationale.ndim != 2:
            raise ValueError(f"rationale {self.rationale.shape}, healthy {self.healthy.shape} and counterfactual "
                             f"{self.counterfactual.shape} must be one R x R")


def split(result: Rationale) -> list[ImageExplanation]:
    return [
        ImageExplanation(
            probability=float(result.p0[i]), probability_healthy=float(result.p_star[i]),
            steps=int(result.steps[i]), ood_score=float(result.ood_score[i]), ood_flag=bool(result.ood_flag[i]),
            reconstruction=result.reconstruction[i], healthy=result.healthy[i], rationale=result.rationale[i],
            counterfactual=result.counterfactual[i], frames=result.frames[i],
        )
        for i in range(len(result))
    ]


def resolve_bundle(path: Path | None, device: str) -> Bundle:
    """Load ``path`` or, when None, the demo bundle shipped with the code."""
    return load_bundle(path or default_bundle_path(), device=device)


def explain_images(
    bundle: Bundle,
    images: Sequence[np.ndarray],
    config: RationaleConfig | None = None,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> list[ImageExplanation]:
    """Explain ``R x R`` model images (float32 in [-1, 1]) ``batch_size`` at a time.

    ``on_batch(n)`` is called after each batch with its size (a progress bar hook).

    Raises:
        ValueError: batch_size < 1 or an image that is not ``R x R`` for this bundle.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    device = next(bundle.generator.parameters()).device
    out: list[ImageExplanation] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        batch = torch.from_numpy(np.stack([np.asarray(a, dtype=np.float32) for a in chunk]))[:, None].to(device)
        out.extend(split(explain(bundle, batch, config)))
        if on_batch is not None:
            on_batch(len(chunk))
    return out


def to_unit(model_space: np.ndarray) -> np.ndarray:
    """Model space [-1, 1] -> display intensities [0, 1] (float32)."""
    return ((np.asarray(model_space, dtype=np.float32) + 1.0) / 2.0).clip(0.0, 1.0)


def artefact_maps(explanation: ImageExplanation, geometry: Geometry) -> dict[str, np.ndarray]:
    """The arrays ``node.artefacts`` names: display units ([0, 1]) on the source grid, the cine in model space.

    The rationale is ``shrink(reconstruction - healthy)`` in those units (half the
    model-space difference), upsampled onto the source grid. No healthy image:
    the node makes the one a reader sees from the source itself,
    ``node.results.overlay.healthy_image(source - rationale)``, at full resolution.
    """
    return {
        "reconstruction": geometry.to_original(to_unit(explanation.reconstruction)),
        "rationale": geometry.to_original(explanation.rationale / 2.0),
        "cine": to_unit(explanation.frames),
    }
