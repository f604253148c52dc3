"""The overlay's colour scale, fixed once per bundle from validation positives.

A per-image scale stretches every map to full colour, so a weak negative looks
as alarming as a certain positive. The bundle instead carries one scale for all
patients: the |rationale| (display units: intensity difference on [0, 1]) that
is drawn at full colour. It is the 75th percentile, over validation images the
classifier calls positive, of each map's 99.5th percentile of |rationale|: a
typical positive uses most of the bar, the strongest quarter saturate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from training.data import to_tensor
from training.evaluate import latents_of

SCALE_PERCENTILE = 75.0
PIXEL_PERCENTILE = 99.5


def rationale_scale(bundle: Any, images: np.ndarray, max_images: int = 48, batch: int = 16) -> dict[str, Any]:
    """Explain up to ``max_images`` of ``images`` (uint8 model images) that the bundle calls positive."""
    from inference.rationale import RationaleConfig, explain

    with torch.no_grad():
        probabilities = bundle.classifier.predict_proba(latents_of(bundle.encoder, images)).numpy()
    chosen = np.flatnonzero(probabilities >= bundle.manifest.decision_threshold)[:max_images]
    if chosen.size == 0:
        raise ValueError("no validation image is called positive: cannot fix the overlay's colour scale")
    peaks = []
    for start in range(0, chosen.size, batch):
        result = explain(bundle, to_tensor(images[chosen[start:start + batch]]), RationaleConfig())
        display = np.abs(result.rationale) / 2.0  # model space [-1, 1] -> display [0, 1]
        peaks.extend(np.percentile(display.reshape(len(display), -1), PIXEL_PERCENTILE, axis=1))
    scale = float(np.percentile(peaks, SCALE_PERCENTILE))
    return {"rationale_scale": round(max(scale, 1e-3), 4), "rationale_scale_images": int(chosen.size),
            "rationale_scale_rule": f"p{SCALE_PERCENTILE:g} over validation positives of each map's "
                                    f"p{PIXEL_PERCENTILE:g} |rationale| (display units)"}
