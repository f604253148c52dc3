"""Held-out phantoms with their healthy twins, at model resolution, for the rationale benchmark.

Why twins: a phantom's ``image - twin`` is exactly what the disease added (zero
outside the signs' masks), so a rationale can be scored against the *true*
difference of this very image, not only against where signs usually are. A
fixed template can land on "where signs usually are"; it cannot follow each
image's own difference.

Why the twin is not simply passed through ``array_to_model_image``: that call
min-max scales each image on its own, and a sign can move the maximum (an
effusion is brighter than anything in the twin), so the twin would be scaled
differently and ``x - twin`` would be non-zero everywhere. The twin is scaled
with the *image's* (min, max) and then resized exactly as the image is;
:func:`model_pair` checks that the same code reproduces the image's own
preprocessing bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from inference.preprocess import array_to_model_image

PHANTOM_SIZE = 256  # the demo recipe trains on phantoms:...@256
TEST_SEEDS = range(900_000, 900_200)  # far above every range the demo recipe trains or evaluates on
VALIDATION_SEEDS = range(800_000, 800_100)  # for choosing lambda; never the test seeds


def parse_seeds(text: str) -> range:
    """``"A-B"`` (inclusive) -> ``range(A, B + 1)``."""
    start, _, end = text.partition("-")
    first, last = int(start), int(end or start)
    if not 0 <= first <= last:
        raise ValueError(f"seeds must be A-B with 0 <= A <= B, got {text!r}")
    return range(first, last + 1)


def _resize(plane: np.ndarray, resolution: int) -> np.ndarray:
    """The preprocessing's resize: PIL bilinear (antialiased) on float32."""
    image = Image.fromarray(np.asarray(plane, dtype=np.float32), mode="F")
    return np.asarray(image.resize((resolution, resolution), Image.Resampling.BILINEAR), dtype=np.float32)


def model_pair(image: np.ndarray, twin: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, twin) as model images in [-1, 1], both scaled with the image's intensity range.

    Raises:
        ValueError: a non-square phantom (the shortcut assumes no padding), or a
            mismatch with ``array_to_model_image`` (the preprocessing changed under us).
    """
    if image.ndim != 2 or image.shape[0] != image.shape[1] or twin.shape != image.shape:
        raise ValueError(f"expected square image and twin of one shape, got {image.shape} and {twin.shape}")
    low, high = float(image.min()), float(image.max())
    span = high - low if high > low else 1.0

    def to_model(plane: np.ndarray) -> np.ndarray:
        unit = ((np.asarray(plane, dtype=np.float64) - low) / span).astype(np.float32)
        out: np.ndarray = (np.clip(_resize(unit, resolution), 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)
        return out

    x = to_model(image)
    reference = array_to_model_image(image, resolution)[0]
    if not np.allclose(x, reference, atol=1e-5):
        raise ValueError("model_pair no longer matches inference.preprocess.array_to_model_image")
    return reference, to_model(twin)


def touched(mask: np.ndarray, resolution: int) -> np.ndarray:
    """Model pixels a full-resolution mask contributes to through the preprocessing's resize.

    A sign's mask covers every pixel the sign changes; after the (antialiased)
    resize, the model pixels the sign changes are exactly those it touches.
    """
    return _resize(mask.astype(np.float32), resolution) > 1e-6


def covered(mask: np.ndarray, resolution: int) -> np.ndarray:
    """Model pixels mostly inside a full-resolution mask (for regions such as the lungs)."""
    return _resize(mask.astype(np.float32), resolution) > 0.5


def effusion_zones(effusion: np.ndarray, cardiomegaly: np.ndarray, sides: tuple[float, float]) -> np.ndarray:
    """2 x R x R (patient right = image left, patient left): where a one-sided effusion is, and the same
    place mirrored onto the other side; both without the enlarged heart's pixels.

    Why mirrored and not "the lower lung zone": the other signs put energy in the
    lower zones too (the enlarged heart grows into the patient's left base, edema
    fills both), so even the exact ``x - twin`` picks the wrong side in about half
    of the right-sided effusions that way. The mirrored region without the heart
    compares like with like; edema, on both sides, cancels. Empty for no or
    two-sided effusions.
    """
    zones = np.zeros((2, *effusion.shape), dtype=bool)
    right, left = sides[0] > 0, sides[1] > 0
    if right != left:
        own = 0 if right else 1
        zones[own] = effusion & ~cardiomegaly
        zones[1 - own] = effusion[:, ::-1] & ~effusion & ~cardiomegaly
    return zones


@dataclass(frozen=True)
class PhantomSet:
    """N phantoms at model resolution R: everything the metrics need, per image.

    ``images`` N x 1 x R x R (torch, for the explainers), ``twins`` N x R x R,
    ``signs`` sign -> N x R x R (model pixels the sign changes), ``organs``
    lungs + heart, ``zones`` N x 2 x R x R effusion zones (patient right, left; see
    :func:`effusion_zones`),
    ``severities`` sign -> N, ``effusion_sides`` N x 2 (patient right, left).
    """

    seeds: np.ndarray
    images: torch.Tensor
    twins: np.ndarray
    signs: dict[str, np.ndarray]
    organs: np.ndarray
    zones: np.ndarray
    severities: dict[str, np.ndarray]
    effusion_sides: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.seeds)

    @property
    def x(self) -> np.ndarray:
        return self.images[:, 0].numpy()

    @property
    def difference(self) -> np.ndarray:
        """``x - twin`` at model resolution: what the disease added, the fidelity reference."""
        out: np.ndarray = self.x - self.twins
        return out

    @property
    def union(self) -> np.ndarray:
        out: np.ndarray = np.logical_or.reduce(list(self.signs.values()))
        return out

    def subset(self, chosen: np.ndarray) -> PhantomSet:
        index = np.nonzero(chosen)[0] if chosen.dtype == np.bool_ else chosen
        return PhantomSet(
            seeds=self.seeds[index], images=self.images[torch.from_numpy(index)], twins=self.twins[index],
            signs={k: v[index] for k, v in self.signs.items()}, organs=self.organs[index], zones=self.zones[index],
            severities={k: v[index] for k, v in self.severities.items()},
            effusion_sides=self.effusion_sides[index], labels=self.labels[index])


def load_phantoms(seeds: range | list[int], resolution: int, size: int = PHANTOM_SIZE) -> PhantomSet:
    """Draw each phantom and its twin at ``size`` px and bring both to model resolution."""
    from training.phantoms import SIGNS, anatomy_masks, make_phantom, make_twin

    size = max(size, resolution)
    xs, twins, organs, zones, sides, labels = [], [], [], [], [], []
    signs: dict[str, list[np.ndarray]] = {name: [] for name in SIGNS}
    severities: dict[str, list[float]] = {name: [] for name in SIGNS}
    for seed in seeds:
        phantom = make_phantom(seed, size)
        x, twin = model_pair(phantom.image, make_twin(seed, size), resolution)
        xs.append(x)
        twins.append(twin)
        anatomy = anatomy_masks(seed, size)
        organs.append(covered(anatomy["lungs"], resolution) | covered(anatomy["heart"], resolution))
        for name in SIGNS:
            signs[name].append(touched(phantom.masks[name], resolution))
            severities[name].append(phantom.severities[name])
        zones.append(effusion_zones(signs["effusion"][-1], signs["cardiomegaly"][-1], phantom.effusion_sides))
        sides.append(phantom.effusion_sides)
        labels.append(phantom.label)
    return PhantomSet(
        seeds=np.asarray(list(seeds)), images=torch.from_numpy(np.stack(xs))[:, None], twins=np.stack(twins),
        signs={k: np.stack(v) for k, v in signs.items()}, organs=np.stack(organs), zones=np.stack(zones),
        severities={k: np.asarray(v) for k, v in severities.items()},
        effusion_sides=np.asarray(sides, dtype=np.float64), labels=np.asarray(labels))
