"""The rationale's settings, swept on validation phantoms: which configuration of the optimisation to ship.

Why a config sweep and not only a lambda sweep: the counterfactual's size is
set by several knobs together (the target under which the classifier term lets
go, how softly it does, lambda, the latent priors, the step cap), and the
quantity the issue asks for, how much closer the healthy image gets to the
true healthy twin, depends on all of them. Each configuration is a set of
changes from ``RationaleConfig``'s defaults (``"target=0.05,proximity_weight=0.5"``);
every row runs GVR alone on the *validation* phantoms (never the test seeds)
through the benchmark's metric code, with a bootstrap 95% CI.

The rule (the same as the lambda sweep's): among the configurations with
validity >= 95%, the best median fidelity + mean closer-to-twin. Each row also
says whether it meets every issue-13 target that a configuration can move
(closer to twin >= 0.40, fidelity >= 0.5, own-mask advantage >= 0.10, validity
>= 95%, effusion pointing >= 0.6, <= 2 s per image at batch 16).

A reference row scores the *oracle latent*: ``z* = E(twin)``, the encoded twin,
which needs the answer and so is no method; it is the most any latent can give
through this encoder and generator, whatever the optimisation does.
"""

from __future__ import annotations

import logging
from dataclasses import fields, replace
from typing import Any

import numpy as np
import torch

from benchmarks.rationale_data import PhantomSet, load_phantoms
from benchmarks.rationale_metrics import partners, per_image, summarise
from benchmarks.rationale_quality import MIN_VALIDITY, classifier_positives, run_gvr
from inference.bundle import Bundle
from inference.rationale import RationaleConfig, shrink

logger = logging.getLogger(__name__)

KEPT = ("fidelity", "fidelity_organs", "closer_to_twin", "validity", "proximity", "specificity",
        "own_mask_advantage", "pointing_effusion", "pointing_cardiomegaly")
# metric -> (lowest acceptable value, or highest for seconds): the issue-13 targets a configuration can move
TARGETS: dict[str, float] = {"closer_to_twin": 0.40, "fidelity": 0.5, "own_mask_advantage": 0.10,
                             "validity": MIN_VALIDITY, "pointing_effusion": 0.6}
MAX_SECONDS = 2.0
ORACLE = "encoded twin (oracle latent, reference)"
SWEPT = ("weight", "distance", "proximity_weight", "prior_weight", "temperature", "target", "lr", "max_steps",
         "tolerance", "patience", "noise_floor")


def _value(name: str, text: str) -> Any:
    """One setting's value from text, typed like the ``RationaleConfig`` field it sets."""
    if name in ("target", "noise_floor") and text.lower() in ("default", "none"):
        return None
    if name == "distance":
        return text
    if name in ("max_steps", "patience"):
        return int(text)
    return float(text)


def parse_configs(text: str) -> list[dict[str, Any]]:
    """``"target=0.05;target=0.02,proximity_weight=0.5;default"`` -> one dict of changes per configuration.

    Raises:
        ValueError: a setting that is not swept (``RationaleConfig`` field) or a value it refuses.
    """
    known = {f.name for f in fields(RationaleConfig)} & set(SWEPT)
    configs: list[dict[str, Any]] = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        changes: dict[str, Any] = {}
        for item in part.split(","):
            item = item.strip()
            if not item or item == "default":
                continue
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep or name not in known:
                raise ValueError(f"config item {item!r}: expected NAME=VALUE with NAME one of {sorted(known)}")
            changes[name] = _value(name, value.strip())
        replace(RationaleConfig(), **changes)  # refuses a bad value now, naming the field
        configs.append(changes)
    if not configs:
        raise ValueError(f"no configuration in {text!r}")
    return configs


def label(changes: dict[str, Any]) -> str:
    """``target=0.05, weight=10`` (``default`` for no change)."""
    shown = {k: ("default" if v is None else v) for k, v in changes.items()}
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()) or "default"


def meets_targets(row: dict[str, Any]) -> dict[str, bool]:
    """Each target a configuration can move -> met (on the estimate, not the CI)."""
    metrics = row["metrics"]
    out = {name: bool(np.nan_to_num(metrics[name]["value"], nan=-np.inf) >= low) for name, low in TARGETS.items()}
    out["seconds"] = row["seconds_per_image"] <= MAX_SECONDS
    return out


def sweep_score(row: dict[str, Any]) -> float:
    """Median fidelity + mean closer-to-twin: both 1 for the exact answer; the second sees the amount too."""
    metrics = row["metrics"]
    return float(metrics["fidelity"]["value"] + np.nan_to_num(metrics["closer_to_twin"]["value"], nan=-1.0))


def oracle_row(bundle: Bundle, positives: PhantomSet, partner: np.ndarray, threshold: float) -> dict[str, Any]:
    """The encoded twin as ``z*``: the rationale ``G(E(x)) - G(E(twin))`` (less the default noise floor, as
    GVR's), the ceiling of any latent method."""
    twins = torch.from_numpy(positives.twins)[:, None]
    with torch.no_grad():
        maps = (bundle.generator.decode(bundle.encoder.encode(positives.images))
                - bundle.generator.decode(bundle.encoder.encode(twins)))[:, 0].numpy()
        p_star = bundle.classifier.predict_proba(bundle.encoder.encode(twins)).numpy()
    maps = shrink(maps, RationaleConfig().floor_for(bundle.manifest.reconstruction_error))
    counterfactual = np.clip(positives.x - maps, -1.0, 1.0)
    values = per_image(maps, positives, partner, counterfactual, p_star, threshold)
    return {"label": ORACLE, "settings": None, "n": len(positives), "mean_steps": float("nan"),
            "seconds_per_image": float("nan"), "metrics": summarise({k: values[k] for k in KEPT if k in values})}


def sweep(bundle: Bundle, seeds: range, configs: list[dict[str, Any]], base: RationaleConfig,
          oracle: bool = False) -> dict[str, Any]:
    """GVR with each configuration (changes from ``base``) on the validation phantoms ``seeds``."""
    data = load_phantoms(seeds, bundle.manifest.resolution)
    positives, _ = classifier_positives(bundle, data)
    threshold = bundle.manifest.decision_threshold
    partner = partners(positives)
    rows: list[dict[str, Any]] = []
    for changes in configs:
        result = run_gvr(bundle, positives.images, replace(base, **changes))
        assert result.steps is not None
        values = per_image(result.maps, positives, partner, result.counterfactual, result.p_star, threshold)
        row: dict[str, Any] = {"label": label(changes), "settings": changes, "n": len(positives),
                               "mean_steps": float(result.steps.mean()),
                               "seconds_per_image": result.seconds_per_image,
                               "metrics": summarise({k: values[k] for k in KEPT})}
        if set(changes) == {"weight"}:
            row["lambda"] = changes["weight"]
        row["meets"] = meets_targets(row)
        rows.append(row)
        logger.info("%s: %s, %.1f steps, %.3f s / image", row["label"],
                    {k: round(v["value"], 3) for k, v in row["metrics"].items()}, row["mean_steps"],
                    row["seconds_per_image"])
    valid = [r for r in rows if r["metrics"]["validity"]["value"] >= MIN_VALIDITY]
    chosen = max(valid, key=sweep_score) if valid else None
    report: dict[str, Any] = {
        "bundle": f"{bundle.manifest.name} {bundle.manifest.version}", "seeds": f"{seeds.start}-{seeds.stop - 1}",
        "held_out": len(data), "positives_with_sign": len(positives), "config": repr(base),
        "threads": torch.get_num_threads(),
        "rule": f"best median fidelity + mean closer-to-twin among configurations with validity >= "
                f"{MIN_VALIDITY:.0%}",
        "chosen": chosen["label"] if chosen else None,
        "chosen_lambda": chosen.get("lambda") if chosen else None,
        "meeting_every_target": [r["label"] for r in rows if all(r["meets"].values())],
        "rows": rows}
    if oracle:
        report["oracle"] = oracle_row(bundle, positives, partner, threshold)
    return report
