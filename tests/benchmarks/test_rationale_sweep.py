"""The configuration sweep reads its configurations strictly and writes its own docs block.

Why: a misspelt setting silently ignored would sweep the default many times
over; and the sweep's table lives between its own markers, so a benchmark run
that does not sweep must leave it alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.rationale_report import BEGIN, CONFIG_BEGIN, CONFIG_END, report_from
from benchmarks.rationale_sweep import ORACLE, label, meets_targets, parse_configs


def test_parse_configs_types_each_setting_and_refuses_unknown_or_bad_values() -> None:
    configs = parse_configs("default; target=0.05 ;target=default,proximity_weight=0.5,max_steps=300;distance=l2")
    assert configs == [{}, {"target": 0.05}, {"target": None, "proximity_weight": 0.5, "max_steps": 300},
                       {"distance": "l2"}]
    assert isinstance(configs[2]["max_steps"], int)
    assert [label(c) for c in configs] == ["default", "target=0.05",
                                           "target=default, proximity_weight=0.5, max_steps=300", "distance=l2"]
    for text, match in (("lamda=3", "lamda"), ("target=2", "target"), ("weight", "NAME=VALUE"),
                        ("frames=4", "frames"), (" ; ", "no configuration")):
        with pytest.raises(ValueError, match=match):
            parse_configs(text)


def _metric(value: float) -> dict[str, Any]:
    return {"value": value, "low": value, "high": value, "n": 10, "statistic": "mean"}


def _row(name: str, closer: float, seconds: float) -> dict[str, Any]:
    metrics = {k: _metric(v) for k, v in (("closer_to_twin", closer), ("fidelity", 0.7), ("specificity", 0.6),
                                          ("own_mask_advantage", 0.2), ("pointing_effusion", 0.8),
                                          ("validity", 1.0), ("proximity", 0.01))}
    row = {"label": name, "settings": {}, "n": 10, "mean_steps": 20.0, "seconds_per_image": seconds,
           "metrics": metrics}
    row["meets"] = meets_targets(row)
    return row


def test_targets_and_the_config_block(tmp_path: Path) -> None:
    met, slow = _row("weight=50", 0.45, 0.5), _row("target=0.02", 0.45, 2.5)
    assert all(met["meets"].values()) and not slow["meets"]["seconds"]
    assert not _row("default", 0.1, 0.5)["meets"]["closer_to_twin"]
    oracle = {**_row(ORACLE, 0.6, float("nan")), "mean_steps": float("nan"), "meets": None}
    report = {"bundle": "test 0", "seeds": "800000-800009", "positives_with_sign": 10, "threads": 1,
              "rule": "r", "chosen": "weight=50", "meeting_every_target": ["weight=50"], "rows": [met, slow],
              "oracle": oracle}
    (tmp_path / "rationale_config_sweep.json").write_text(json.dumps(report))
    doc = tmp_path / "rationale.md"
    doc.write_text(f"# Title\n\n{CONFIG_BEGIN}\nOLD TABLE\n{CONFIG_END}\n\nafter\n")
    report_from(tmp_path, doc)
    text = doc.read_text()
    assert "OLD TABLE" not in text and text.count(CONFIG_BEGIN) == 1 and text.count(CONFIG_END) == 1
    assert "| weight=50 (best by the rule) | 0.45 [0.45, 0.45] |" in text and "| yes |" in text and "no: seconds" in text
    assert f"| {ORACLE} | 0.60 [0.60, 0.60] |" in text and text.index("after") < text.index(BEGIN)
