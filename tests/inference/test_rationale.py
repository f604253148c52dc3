"""Latent optimisation: lowers p on positives, leaves negatives, stays close, deterministic, batch = sequential."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.bundle import Bundle
from inference.preprocess import array_to_model_image
from inference.rationale import Distance, GVRExplainer, RationaleConfig, explain, shrink
from training.phantoms import make_phantom


@pytest.fixture(scope="module")
def images(tiny_bundle: Bundle) -> torch.Tensor:
    """24 held-out phantoms (seeds the tiny bundle never saw) as a model batch."""
    r = tiny_bundle.manifest.resolution
    size = max(64, 2 * r)
    pixels = [array_to_model_image(np.asarray(make_phantom(seed, size).image), r)[0] for seed in range(500, 524)]
    return torch.from_numpy(np.stack(pixels))[:, None]


@pytest.fixture(scope="module")
def split(tiny_bundle: Bundle, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives, negatives): the images the classifier scores above the threshold / below the target."""
    with torch.no_grad():
        p = tiny_bundle.classifier.predict_proba(tiny_bundle.encoder.encode(images))
    threshold = tiny_bundle.manifest.decision_threshold
    positives, negatives = images[p >= threshold], images[p < threshold / 2]
    assert len(positives) >= 2 and len(negatives) >= 2, f"tiny bundle scores {p.tolist()}"
    return positives, negatives


def test_config_validates_and_coerces() -> None:
    """Bad values are ValueErrors naming the field; a distance given as text becomes the enum."""
    assert RationaleConfig(distance="l2").distance is Distance.L2  # type: ignore[arg-type]
    for kwargs, field in (({"weight": -1}, "weight"), ({"target": 1.5}, "target"), ({"lr": 0}, "lr"),
                          ({"max_steps": -1}, "max_steps"), ({"frames": 1}, "frames"),
                          ({"prior_weight": float("nan")}, "prior_weight"),
                          ({"proximity_weight": -1}, "proximity_weight"), ({"temperature": 0}, "temperature"),
                          ({"patience": 0}, "patience"), ({"tolerance": -1}, "tolerance"),
                          ({"noise_floor": -0.1}, "noise_floor")):
        with pytest.raises(ValueError, match=field):
            RationaleConfig(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RationaleConfig(distance="l3")  # type: ignore[arg-type]


def test_explain_lowers_probability_of_positive_and_stays_close(tiny_bundle: Bundle, split: tuple) -> None:
    """Every positive ends below the decision threshold; the healthy decoding differs little from the original."""
    positives, _ = split
    result = explain(tiny_bundle, positives, RationaleConfig(max_steps=300))
    assert (result.p_star < tiny_bundle.manifest.decision_threshold).all() and (result.p_star < result.p0).all()
    assert (result.steps > 0).all()
    change = np.abs(result.healthy - result.reconstruction).mean(axis=(1, 2))
    assert change.max() < 0.1, change  # model space spans 2.0
    floor = tiny_bundle.manifest.reconstruction_error["p50"]  # the default noise floor
    np.testing.assert_allclose(result.rationale, shrink(result.reconstruction - result.healthy, floor), atol=1e-6)
    np.testing.assert_allclose(result.frames[:, 0], result.reconstruction, atol=1e-5)
    np.testing.assert_allclose(result.frames[:, -1], result.healthy, atol=1e-5)


def test_noise_floor_shrinks_small_changes_off_the_rationale(tiny_bundle: Bundle, split: tuple) -> None:
    """floor 0: the raw difference G(z0) - G(z*); floor f: every |change| less f, changes under f exactly 0,
    and the counterfactual follows the shrunk map."""
    positives, _ = split
    raw = explain(tiny_bundle, positives[:2], RationaleConfig(noise_floor=0.0, max_steps=40))
    np.testing.assert_allclose(raw.rationale, raw.reconstruction - raw.healthy, atol=1e-6)
    floor = float(np.percentile(np.abs(raw.rationale), 50))
    shrunk = explain(tiny_bundle, positives[:2], RationaleConfig(noise_floor=floor, max_steps=40))
    np.testing.assert_allclose(np.abs(shrunk.rationale), np.maximum(np.abs(raw.rationale) - floor, 0), atol=1e-6)
    assert (shrunk.rationale[np.abs(raw.rationale) <= floor] == 0).all()
    assert (np.sign(shrunk.rationale) * np.sign(raw.rationale) >= 0).all()
    x = positives[:2, 0].numpy()
    np.testing.assert_allclose(shrunk.counterfactual, np.clip(x - shrunk.rationale, -1, 1), atol=1e-6)


def test_explain_leaves_negative_unchanged(tiny_bundle: Bundle, split: tuple) -> None:
    """An image already below the target takes no step: p* = p0 and the rationale is zero."""
    _, negatives = split
    result = explain(tiny_bundle, negatives)
    assert (result.steps == 0).all()
    np.testing.assert_allclose(result.p_star, result.p0, atol=1e-6)
    assert np.abs(result.rationale).max() < 1e-5


def test_objective_decreases_to_convergence(tiny_bundle: Bundle, split: tuple) -> None:
    """The objective at z* is below the one at z0 for every positive, and the run converges before the cap."""
    positives, _ = split
    result = explain(tiny_bundle, positives, RationaleConfig(max_steps=400))
    assert (result.objective_end < result.objective_start - 0.1).all(), (result.objective_start,
                                                                          result.objective_end)
    assert result.converged.mean() >= 0.8 and (result.steps[result.converged] < 400).all()


def test_lambda_changes_proximity_monotonically(tiny_bundle: Bundle, split: tuple) -> None:
    """A larger lambda keeps G(z*) closer to G(z0): the mean |rationale| falls as lambda grows."""
    positives, _ = split
    change = []
    for weight in (1.0, 20.0, 400.0):
        result = explain(tiny_bundle, positives, RationaleConfig(weight=weight, max_steps=300))
        change.append(float(np.abs(result.rationale).mean()))
    assert change[0] > change[1] > change[2], change


def test_distance_term_shapes_the_end_point(tiny_bundle: Bundle, split: tuple) -> None:
    """The classifier term is bounded below, so the distance term decides where z* settles: with lambda the
    counterfactual stops near the target; without it, it runs much further from z0 and deeper below the target."""
    positives, _ = split
    held = explain(tiny_bundle, positives, RationaleConfig(max_steps=300))
    free = explain(tiny_bundle, positives, RationaleConfig(weight=0.0, proximity_weight=0.0, prior_weight=0.0,
                                                           max_steps=300))
    assert np.median(held.p_star) > 5 * np.median(free.p_star), (held.p_star, free.p_star)
    assert np.abs(held.rationale).mean() < np.abs(free.rationale).mean()


def test_explain_is_deterministic(tiny_bundle: Bundle, images: torch.Tensor) -> None:
    """Two runs with one config give bit-identical maps and steps."""
    config = RationaleConfig(distance=Distance.L2, prior_weight=0.1, seed=3)
    a, b = explain(tiny_bundle, images[:8], config), explain(tiny_bundle, images[:8], config)
    np.testing.assert_array_equal(a.rationale, b.rationale)
    np.testing.assert_array_equal(a.steps, b.steps)


def test_explain_batch_equals_sequential(tiny_bundle: Bundle, images: torch.Tensor) -> None:
    """One batch of 6 gives each image what it gets alone (frozen images neither move nor cost a decode)."""
    batch = explain(tiny_bundle, images[:6])
    for i in range(6):
        alone = explain(tiny_bundle, images[i:i + 1])
        assert alone.steps[0] == batch.steps[i]
        # float noise of a batched decode (~1e-7) can tip which of two near-equal late steps is kept as best
        np.testing.assert_allclose(alone.rationale[0], batch.rationale[i], atol=2e-3)
        np.testing.assert_allclose(alone.p_star[0], batch.p_star[i], atol=1e-3)


def test_explain_flags_out_of_distribution(tiny_bundle: Bundle, images: torch.Tensor) -> None:
    """Noise is far from what the encoder learned: its score is above p99 and flagged."""
    r = tiny_bundle.manifest.resolution
    noise = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (2, 1, r, r)).astype(np.float32))
    result = explain(tiny_bundle, torch.cat([images[:2], noise]), RationaleConfig(max_steps=0))
    p99 = tiny_bundle.manifest.reconstruction_error["p99"]
    assert (result.ood_score[2:] > p99).all() and result.ood_flag[2:].all()
    assert result.ood_score[:2].max() < result.ood_score[2:].min()


def test_gvr_explainer_has_the_common_call_shape(tiny_bundle: Bundle, images: torch.Tensor) -> None:
    """images N x 1 x R x R -> maps N x R x R; a wrong shape is a ValueError that names it."""
    r = tiny_bundle.manifest.resolution
    maps = GVRExplainer(tiny_bundle, RationaleConfig(max_steps=5))(images[:3])
    assert maps.shape == (3, r, r)
    with pytest.raises(ValueError, match=f"N x 1 x {r} x {r}"):
        GVRExplainer(tiny_bundle)(images[:3, 0])
