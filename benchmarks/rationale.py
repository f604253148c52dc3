"""Rationale benchmarks: quality on phantoms with known masks, the MNIST (digits) experiment, speed.

Why: a rationale is only useful if it falls where the disease is. Phantoms carry
a mask per heart-failure sign, so localisation can be *measured*: GVR against
Latent Shift and captum's Saliency, IntegratedGradients, Occlusion and
LayerGradCam on ``f(E(x))``, plus a random map (chance) and the paper's control,
GVR through a deliberately overfitted classifier, which should localise worse.

Metrics, on held-out phantoms the classifier calls positive and that show a sign:
pointing game (the maximum of |map| inside the union of the signs' masks), IoU
of the top-|mask| pixels of |map| with the mask, share of |map| energy inside the
mask; for the counterfactual methods also validity (share whose p* falls below
the decision threshold) and proximity (mean |G(z*) - G(z0)| in display units).

Run: ``make bench-rationale`` or ``python -m benchmarks.rationale [quality|mnist|speed|all] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from inference.bundle import Bundle, default_bundle_path, load_bundle
from inference.preprocess import MIN_SIDE, array_to_model_image
from inference.rationale import Explainer, GVRExplainer, RationaleConfig

logger = logging.getLogger(__name__)

HELD_OUT_SEED = 900_000  # far above any training range the demo recipe uses
BATCH = 16
PHANTOM_SIZE = 256  # the demo bundle was trained on phantoms:...@256


def mask_at(mask: np.ndarray, resolution: int) -> np.ndarray:
    """A boolean mask resampled to ``resolution`` (area mean > 0.5; its best pixels if none pass)."""
    if mask.shape[0] == resolution:
        return mask
    cover = np.asarray(Image.fromarray(mask.astype(np.float32), mode="F").resize(
        (resolution, resolution), Image.Resampling.BOX), dtype=np.float32)
    out = cover > 0.5
    if not out.any() and cover.max() > 0:
        out = cover >= cover.max()
    return out


def held_out_phantoms(n: int, resolution: int, size: int = PHANTOM_SIZE) -> tuple[torch.Tensor, np.ndarray]:
    """(model images N x 1 x R x R, union-of-signs masks N x R x R) of phantoms never trained on.

    Drawn at ``size`` px (the demo recipe's ``@256``) and preprocessed like training images.
    """
    from training.phantoms import make_phantom

    images, masks = [], []
    for seed in range(HELD_OUT_SEED, HELD_OUT_SEED + n):
        phantom = make_phantom(seed, max(size, resolution, MIN_SIDE))
        images.append(array_to_model_image(np.asarray(phantom.image), resolution)[0])
        union = np.logical_or.reduce([m for m in phantom.masks.values()])
        masks.append(mask_at(union, resolution))
    return torch.from_numpy(np.stack(images))[:, None], np.stack(masks)


def localisation(maps: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: pointing hit, IoU of the top-|mask| pixels, energy share inside the mask."""
    magnitude = np.abs(maps).reshape(len(maps), -1)
    flat = masks.reshape(len(masks), -1)
    pointing = np.array([m.max() > 0 and bool(f[m.argmax()]) for m, f in zip(magnitude, flat, strict=True)])
    iou, energy = np.zeros(len(maps)), np.zeros(len(maps))
    for i, (m, f) in enumerate(zip(magnitude, flat, strict=True)):
        k = int(f.sum())
        top = np.zeros_like(f)
        if m.max() > 0:
            top[np.argsort(-m, kind="stable")[:k]] = True
        iou[i] = (top & f).sum() / max(1, (top | f).sum())
        energy[i] = m[f].sum() / m.sum() if m.sum() > 0 else 0.0
    return {"pointing": pointing.astype(float), "iou": iou, "energy": energy}


def run_batched(explainer: Explainer, images: torch.Tensor) -> tuple[np.ndarray, float]:
    """(maps N x R x R, seconds per image)."""
    start, maps = time.perf_counter(), []
    for i in range(0, len(images), BATCH):
        maps.append(explainer(images[i:i + BATCH]).detach().cpu().numpy())
    return np.concatenate(maps), (time.perf_counter() - start) / max(1, len(images))


def _random_maps(images: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).random((len(images), *images.shape[2:])).astype(np.float32))


def quality(bundle: Bundle, n: int, out: Path, config: RationaleConfig) -> dict[str, Any]:
    """The phantom benchmark: table rows per method, written as JSON, markdown and a figure grid."""
    from benchmarks.rationale_baselines import all_explainers

    images, masks = held_out_phantoms(n, bundle.manifest.resolution)
    with torch.no_grad():
        p0 = bundle.classifier.predict_proba(bundle.encoder.encode(images)).numpy()
    chosen = (p0 >= bundle.manifest.decision_threshold) & masks.reshape(n, -1).any(1)
    positives, pos_masks = images[chosen], masks[chosen]
    logger.info("%d of %d held-out phantoms are positive with a visible sign", len(positives), n)
    explainers = {**all_explainers(bundle, config), "Random": _random_maps}
    rows, examples = [], {}
    for name, explainer in explainers.items():
        maps, seconds = run_batched(explainer, positives)
        examples[name] = maps[:6]
        row = {"method": name, "n": len(positives), "seconds_per_image": seconds,
               **{k: float(v.mean()) for k, v in localisation(maps, pos_masks).items()}}
        recorded = getattr(explainer, "p_star", None)
        if recorded:  # a counterfactual method: maps are G(z0) - G(z*) in model space
            row["validity"] = float((np.concatenate(recorded) < bundle.manifest.decision_threshold).mean())
            row["proximity"] = float(np.abs(maps).mean() / 2)
        if getattr(explainer, "steps", None):
            row["mean_steps"] = float(np.concatenate(explainer.steps).mean())  # type: ignore[attr-defined]
        rows.append(row)
        logger.info("%s: %s", name, row)
    rows.extend(_overfit_control(bundle, images, masks, chosen, config))
    out.mkdir(parents=True, exist_ok=True)
    shown = {name: maps for name, maps in examples.items() if name != "Random"}  # noise says nothing, weighs much
    _figure(positives[:6, 0].numpy(), shown, pos_masks[:6], out / "rationale_quality.png")
    report = {"bundle": f"{bundle.manifest.name} {bundle.manifest.version}", "resolution": bundle.manifest.resolution,
              "held_out": n, "positives_with_sign": int(chosen.sum()), "config": repr(config), "rows": rows}
    (out / "rationale_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "rationale_quality.md").write_text(quality_table(rows) + "\n")
    return report


def _overfit_control(bundle: Bundle, images: torch.Tensor, masks: np.ndarray, main_positives: np.ndarray,
                     config: RationaleConfig) -> list[dict[str, Any]]:
    """GVR through the overfitted classifier: on the images *it* calls positive (p >= 0.5), and on the
    main classifier's positives (the same images as the other rows)."""
    if bundle.overfit_classifier is None:
        logger.warning("bundle has no overfit_classifier: the control rows are skipped")
        return []
    target = config.target if config.target is not None else bundle.manifest.decision_threshold / 2
    control = replace(bundle, classifier=bundle.overfit_classifier)
    explainer = GVRExplainer(control, replace(config, target=target))
    with torch.no_grad():
        p0 = control.classifier.predict_proba(control.encoder.encode(images)).numpy()
    rows = []
    for label, chosen in (("its own positives", (p0 >= 0.5) & masks.reshape(len(masks), -1).any(1)),
                          ("same images", main_positives)):
        maps, seconds = run_batched(explainer, images[chosen])
        rows.append({"method": f"GVR, overfitted classifier ({label})", "n": int(chosen.sum()),
                     "seconds_per_image": seconds, "proximity": float(np.abs(maps).mean() / 2),
                     **{k: float(v.mean()) for k, v in localisation(maps, masks[chosen]).items()}})
    return rows


def quality_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | n | pointing game | IoU | energy in mask | validity | proximity | s / image |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        validity = r.get("validity")
        shown_validity = "" if validity is None else f"{validity:.0%}"
        shown_proximity = f"{r['proximity']:.4f}" if "proximity" in r else ""
        lines.append(f"| {r['method']} | {r['n']} | {r['pointing']:.2f} | {r['iou']:.3f} | {r['energy']:.3f} | "
                     f"{shown_validity} | {shown_proximity} | {r['seconds_per_image']:.3f} |")
    return "\n".join(lines)


def _figure(inputs: np.ndarray, examples: dict[str, np.ndarray], masks: np.ndarray, path: Path) -> None:
    """Rows of examples: input, each method's map, the mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["input", *examples, "mask"]
    fig, axes = plt.subplots(len(inputs), len(columns), figsize=(1.6 * len(columns), 1.6 * len(inputs)),
                             squeeze=False)
    for row in range(len(inputs)):
        panels = [(inputs[row], "gray", None), *[(examples[name][row], "bwr" if name in ("GVR", "LatentShift")
                                                  else "magma", name) for name in examples], (masks[row], "gray", None)]
        for col, (image, cmap, name) in enumerate(panels):
            ax = axes[row][col]
            if cmap == "bwr":
                limit = float(np.abs(image).max()) or 1.0
                ax.imshow(image, cmap=cmap, vmin=-limit, vmax=limit)
            else:
                ax.imshow(np.abs(image) if name else image, cmap=cmap)
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rationale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="?", choices=("quality", "mnist", "speed", "all"), default="all")
    parser.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the demo bundle)")
    parser.add_argument("--n", type=int, default=240, help="held-out phantoms for the quality benchmark")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-rationale"), help="figures and tables")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every benchmark")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bundle = load_bundle(args.bundle or default_bundle_path()) if args.which != "mnist" else None
    config = RationaleConfig()
    summary: dict[str, Any] = {}
    if bundle is not None and args.which in ("quality", "all"):
        report = quality(bundle, 48 if args.quick else args.n, args.out, config)
        print(f"\n## Rationale quality ({report['bundle']}, {report['positives_with_sign']} positives of "
              f"{report['held_out']} held-out phantoms)\n\n{quality_table(report['rows'])}")
        summary["quality"] = report
    if bundle is not None and args.which in ("speed", "all"):
        from benchmarks.rationale_speed import speed, speed_table

        rows = speed(bundle, config, repeats=1 if args.quick else 3)
        print(f"\n## Speed ({torch.get_num_threads()} threads)\n\n{speed_table(rows)}")
        summary["speed"] = rows
    if args.which in ("mnist", "all"):
        from benchmarks.mnist_gvr import mnist_experiment

        summary["mnist"] = mnist_experiment(args.out, quick=args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
