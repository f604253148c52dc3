"""``gvr evaluate``: held-out metrics of a bundle (AUC with 95% CI, operating point, calibration, OOD)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from node.cli.common import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gvr evaluate", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="bundle folder (manifest.json + weights)")
    parser.add_argument("--labels", required=True,
                        help="held-out CSV (columns path, bnp) or phantoms:START-END[@SIZE] never used in training")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.json and PNGs")
    parser.add_argument("--threshold", type=float, default=None,
                        help="BNP threshold (ng/L); default: the bundle's")
    parser.add_argument("--baseline-labels", default=None,
                        help="the labelled training set (CSV or phantoms:...): also fit the 8x8 pooled-pixel "
                             "logistic regression on it and report its held-out AUC beside the bundle's")
    parser.add_argument("--colour-scale-from", default=None,
                        help="validation images (CSV or phantoms:..., never the held-out set): fix the overlay's "
                             "colour scale from the rationales of those the bundle calls positive")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the AUC interval")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="processes that render phantoms")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from inference.bundle import BundleInvalidError, load_bundle
    from training.data import load_labelled
    from training.evaluate import evaluate_bundle

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    started = time.monotonic()
    try:
        bundle = load_bundle(args.bundle)
        threshold = args.threshold if args.threshold is not None else bundle.manifest.bnp_threshold
        data = load_labelled(args.labels, bundle.manifest.resolution, threshold, args.workers)
        baseline = (load_labelled(args.baseline_labels, bundle.manifest.resolution, threshold, args.workers)
                    if args.baseline_labels else None)
        report = evaluate_bundle(bundle, data, args.out, args.bootstrap, args.seed, baseline)
        if args.colour_scale_from:
            from training.colour_scale import rationale_scale

            validation = load_labelled(args.colour_scale_from, bundle.manifest.resolution, threshold, args.workers)
            report.update(rationale_scale(bundle, validation.images))
    except (BundleInvalidError, ValueError, OSError) as exc:
        print(f"gvr evaluate: {exc}", file=sys.stderr)
        return 2
    report["data"] = args.labels
    report["bundle"] = f"{bundle.manifest.name} {bundle.manifest.version}"
    report["wall_seconds"] = round(time.monotonic() - started, 1)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    summary = {k: report[k] for k in ("n", "auc", "auc_ci95", "sensitivity", "specificity", "reconstruction_mae")}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
