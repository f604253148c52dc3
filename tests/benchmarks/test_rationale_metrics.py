"""The rationale benchmark's metrics can fail a template and pass the truth.

Why: a benchmark that a fixed map passes measures nothing about the image.
These run on a dozen phantoms at 64 px, no model: the exact ``x - twin`` must
score the ceiling and image-independent maps must score as templates.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.rationale_data import load_phantoms, model_pair, parse_seeds, touched
from benchmarks.rationale_metrics import (
    bootstrap_ci,
    correlation,
    leave_one_out_mean,
    partners,
    per_image,
    sign_sets,
    summarise,
)
from benchmarks.rationale_quality import MethodMaps, blurred, score
from benchmarks.rationale_report import BEGIN, END, docs_block, report_from, write_docs
from training.phantoms import make_phantom, make_twin

RESOLUTION = 64


@pytest.fixture(scope="module")
def data():  # type: ignore[no-untyped-def]
    """Phantoms with at least one sign (of the first 30 test seeds)."""
    everything = load_phantoms(range(900_000, 900_030), RESOLUTION)
    return everything.subset(everything.union.reshape(len(everything), -1).any(1))


def test_twin_preprocessing_matches_and_differs_only_inside_masks() -> None:
    for seed in (900_003, 900_006, 900_007):
        phantom = make_phantom(seed, 256)
        x, twin = model_pair(phantom.image, make_twin(seed, 256), RESOLUTION)
        union = touched(np.logical_or.reduce(list(phantom.masks.values())), RESOLUTION)
        assert np.abs(x - twin)[~union].max() == 0.0
        assert np.abs(x - twin)[union].max() > 0.05


def test_exact_difference_scores_the_ceiling(data) -> None:  # type: ignore[no-untyped-def]
    values = per_image(data.difference, data, partners(data), counterfactual=data.twins)
    summary = summarise(values)
    for name in ("fidelity", "fidelity_organs", "closer_to_twin", "effusion_side"):
        assert summary[name]["value"] == pytest.approx(1.0), name
    for sign in data.signs:
        if summary[f"pointing_{sign}"]["n"]:
            assert summary[f"pointing_{sign}"]["value"] == pytest.approx(1.0), sign
    assert summary["own_mask_advantage"]["value"] > 0.3
    assert summary["specificity"]["value"] < 0.8


def test_templates_are_caught(data) -> None:  # type: ignore[no-untyped-def]
    fixed = np.broadcast_to(data.difference.mean(0), data.twins.shape).copy()
    for template in (fixed, leave_one_out_mean(data.difference), leave_one_out_mean(data.union.astype(np.float32))):
        summary = summarise(per_image(template, data, partners(data)))
        assert summary["specificity"]["value"] > 0.97
        assert abs(summary["own_mask_advantage"]["value"]) < 0.1
        assert summary["fidelity"]["value"] < 0.7
    assert summarise(per_image(fixed, data, partners(data)))["effusion_side"]["value"] < 0.8


def test_random_maps_score_chance(data) -> None:  # type: ignore[no-untyped-def]
    noise = np.random.default_rng(1).standard_normal(data.twins.shape)
    summary = summarise(per_image(noise, data, partners(data)))
    assert abs(summary["fidelity"]["value"]) < 0.05
    assert abs(summary["specificity"]["value"]) < 0.1


def test_partners_have_another_sign_set(data) -> None:  # type: ignore[no-untyped-def]
    sets, pairs = sign_sets(data), partners(data)
    assert (pairs >= 0).all()
    assert all(sets[i] != sets[j] and j != i for i, j in enumerate(pairs))


def test_correlation_of_constant_is_zero_and_bootstrap_is_deterministic() -> None:
    a = np.zeros((2, 4, 4))
    assert correlation(a, np.random.default_rng(0).random((2, 4, 4))).tolist() == [0.0, 0.0]
    values = np.random.default_rng(0).random(50)
    first, second = bootstrap_ci(values, "median"), bootstrap_ci(values, "median")
    assert first == second and first[1] <= first[0] <= first[2]
    assert bootstrap_ci(np.full(10, 0.5)) == (0.5, 0.5, 0.5)
    assert np.isnan(bootstrap_ci(np.array([np.nan]))[0])


def test_tables_and_docs_block_from_json(data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    results = [MethodMaps("x - twin (ceiling)", data.difference, 0.0, "reference", counterfactual=data.twins,
                          p_star=np.zeros(len(data))),
               MethodMaps("Blurred template", blurred(leave_one_out_mean(data.difference)), 0.0, "template")]
    report = {"bundle": "test 0", "resolution": RESOLUTION, "seeds": "900000-900029", "held_out": 30,
              "with_sign": len(data), "positives_with_sign": len(data), "threads": 1,
              "rows": score(results, data, threshold=0.5)}
    (tmp_path / "rationale_quality.json").write_text(json.dumps(report))
    doc = tmp_path / "rationale.md"
    doc.write_text("# Title\n\nbefore\n")
    report_from(tmp_path, doc)
    once = doc.read_text()
    assert once.count(BEGIN) == 1 and once.count(END) == 1 and "| x - twin (ceiling) | " in once
    assert "1.00 [1.00, 1.00]" in once and "_not run yet (placeholder)_" in once  # sweep, speed not run
    report_from(tmp_path, doc)
    assert doc.read_text() == once
    write_docs(doc, docs_block(None, None, None))
    assert "x - twin (ceiling)" not in doc.read_text() and doc.read_text().startswith("# Title")


def test_parse_seeds() -> None:
    assert parse_seeds("5-7") == range(5, 8) and parse_seeds("9") == range(9, 10)
    with pytest.raises(ValueError):
        parse_seeds("7-5")
