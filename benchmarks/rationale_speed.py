"""Speed of one rationale on this machine, at batch 1 and 16, against its floor.

The floor is what the optimisation cannot avoid: each image's own steps times
its share of one forward + backward pass of ``G`` and ``f`` on the batch (an
image that converged is frozen and no longer decoded). ``ratio`` = measured / floor shows the overhead of everything else
(encoding, the final decodes, the cine, bookkeeping). Run through
``python -m benchmarks.rationale speed``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from inference.bundle import Bundle
from inference.rationale import RationaleConfig, explain

FLOOR_REPEATS = 20


def forward_backward_seconds(bundle: Bundle, batch: torch.Tensor) -> float:
    """Seconds of one optimisation step's pass (decode, distance, logit, backward) on ``batch``."""
    with torch.no_grad():
        z0 = bundle.encoder.encode(batch)
        reference = bundle.generator.decode(z0)
    z = z0.clone().requires_grad_(True)
    with torch.enable_grad():
        for _ in range(3):  # warm-up
            _pass(bundle, z, reference)
        start = time.perf_counter()
        for _ in range(FLOOR_REPEATS):
            _pass(bundle, z, reference)
    return (time.perf_counter() - start) / FLOOR_REPEATS


def _pass(bundle: Bundle, z: torch.Tensor, reference: torch.Tensor) -> None:
    loss = bundle.classifier.logits(z) + (bundle.generator.decode(z) - reference).abs().flatten(1).mean(1)
    z.grad = None
    loss.sum().backward()  # type: ignore[no-untyped-call]


def _positives(bundle: Bundle, count: int) -> torch.Tensor:
    """``count`` held-out phantoms the classifier calls positive (rationales of negatives take 0 steps)."""
    from benchmarks.rationale_data import TEST_SEEDS, load_phantoms

    images = load_phantoms(TEST_SEEDS[:max(4 * count, 64)], bundle.manifest.resolution).images
    with torch.no_grad():
        p = bundle.classifier.predict_proba(bundle.encoder.encode(images))
    chosen = images[p >= bundle.manifest.decision_threshold]
    if len(chosen) < count:
        chosen = images[torch.argsort(p, descending=True)]
    return chosen[:count]


def speed(bundle: Bundle, config: RationaleConfig, repeats: int = 3) -> list[dict[str, Any]]:
    """One row per batch size: seconds per image, mean steps, floor and ratio."""
    images = _positives(bundle, 16)
    explain(bundle, images[:2], config)  # warm-up: the first call pays ~1.5 s of one-time initialisation
    rows = []
    for batch_size in (1, 16):
        walls, floors, steps = [], [], []
        fb = forward_backward_seconds(bundle, images[:batch_size])
        for _ in range(repeats):
            for start in range(0, 16 if batch_size == 16 else 4, batch_size):
                batch = images[start:start + batch_size]
                began = time.perf_counter()
                result = explain(bundle, batch, config)
                walls.append((time.perf_counter() - began) / len(batch))
                # only images still moving are decoded: each image costs its own steps x one pass
                floors.append(float(result.steps.mean()) * fb / len(batch))
                steps.extend(result.steps.tolist())
        wall, floor = float(np.mean(walls)), float(np.mean(floors))
        rows.append({"batch": batch_size, "seconds_per_image": wall, "mean_steps": float(np.mean(steps)),
                     "forward_backward_s": fb, "floor_seconds_per_image": floor,
                     "ratio_to_floor": wall / floor if floor > 0 else float("nan"),
                     "resolution": bundle.manifest.resolution, "threads": torch.get_num_threads()})
    return rows


def speed_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| batch | s / rationale | mean steps | one fwd+bwd (batch) | floor s / rationale | ratio to floor |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['seconds_per_image']:.3f} | {r['mean_steps']:.1f} | "
                     f"{r['forward_backward_s'] * 1000:.1f} ms | {r['floor_seconds_per_image']:.3f} | "
                     f"{r['ratio_to_floor']:.2f} |")
    return "\n".join(lines)
