"""Rationale benchmarks: quality on held-out phantoms with twins, the lambda sweep, the digits, speed.

Why: a rationale is only useful if it shows what *this* image's disease
changed. Phantoms come with a healthy twin (same patient, no signs), so
``x - twin`` is the true answer per image; the quality benchmark scores GVR,
Latent Shift, captum's Saliency, IntegratedGradients, Occlusion and
LayerGradCam, image-independent templates (which must lose), chance, the
ceiling and the overfitted-classifier control, side by side in one run
(``benchmarks.rationale_quality``, metrics in ``benchmarks.rationale_metrics``).

Subcommands:

* ``quality``: held-out phantoms (``--seeds``, default 900000-900199);
* ``sweep``: GVR at each of ``--lambdas`` on ``--validation-seeds`` (800000-800099), picks the default;
  with ``--configs "target=0.05;proximity_weight=0.5,weight=10;..."`` it sweeps whole configurations
  instead (``benchmarks.rationale_sweep``), with the oracle latent as a reference row;
* ``mnist``: the digits experiment (9 -> 4, deletion AUC);
* ``speed``: seconds per rationale at batch 1 and 16 and the ratio to the floor;
* ``report``: rewrite the generated block of ``--docs`` from the JSON in ``--out``;
* ``all``: quality, sweep, speed and mnist.

Run: ``make bench-rationale`` or ``python -m benchmarks.rationale [SUBCOMMAND] [--bundle DIR] [--quick]``.
With ``--docs docs/rationale.md`` the tables and the figure also go into the docs.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.rationale_data import TEST_SEEDS, VALIDATION_SEEDS, PhantomSet, parse_seeds
from inference.bundle import Bundle, default_bundle_path, load_bundle
from inference.rationale import RationaleConfig

logger = logging.getLogger(__name__)

QUICK_SEEDS = 40  # --quick: the first phantoms of each seed range
DEFAULT_LAMBDAS = "5,10,20,30,50"
FIGURE_HIDDEN = ("Random (chance)", "x - twin (ceiling)")  # noise says nothing; x - twin is a column already


def figure_rows(data: PhantomSet, count: int) -> np.ndarray:
    """Up to ``count`` images, one per distinct set of signs first (so the rows differ), then in order."""
    from benchmarks.rationale_metrics import sign_sets

    sets, first = sign_sets(data), dict[frozenset[str], int]()
    for i, signs in enumerate(sets):
        first.setdefault(signs, i)
    chosen = list(first.values())[:count]
    chosen += [i for i in range(len(sets)) if i not in chosen][:count - len(chosen)]
    return np.asarray(sorted(chosen))


def run_quality(bundle: Bundle, seeds: range, config: RationaleConfig, out: Path) -> dict[str, Any]:
    """The quality benchmark: JSON, markdown and the figure grid in ``out``."""
    from benchmarks.rationale_quality import FIGURE_ROWS, quality
    from benchmarks.rationale_report import figure, quality_markdown

    report, positives, results = quality(bundle, seeds, config)
    rows = figure_rows(positives, FIGURE_ROWS)
    shown = {r.name: r.maps[rows] for r in results if r.name not in FIGURE_HIDDEN}
    figure(positives.x[rows], positives.difference[rows], shown, out / "rationale_quality.png")
    (out / "rationale_quality.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = quality_markdown(report)
    (out / "rationale_quality.md").write_text(markdown + "\n")
    print(f"\n## Rationale quality\n\n{markdown}")
    return report


def run_sweep(bundle: Bundle, seeds: range, lambdas: list[float], config: RationaleConfig,
              out: Path) -> dict[str, Any]:
    """The lambda sweep (``all`` runs it): one configuration per lambda."""
    from benchmarks.rationale_report import sweep_markdown
    from benchmarks.rationale_sweep import sweep

    report = sweep(bundle, seeds, [{"weight": weight} for weight in lambdas], config)
    (out / "rationale_sweep.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = sweep_markdown(report)
    (out / "rationale_sweep.md").write_text(markdown + "\n")
    print(f"\n## Lambda sweep\n\n{markdown}")
    return report


def run_config_sweep(bundle: Bundle, seeds: range, configs: list[dict[str, Any]], config: RationaleConfig,
                     out: Path) -> dict[str, Any]:
    """Whole configurations (``sweep --configs``), with the oracle latent as a reference row."""
    from benchmarks.rationale_report import config_sweep_markdown
    from benchmarks.rationale_sweep import sweep

    report = sweep(bundle, seeds, configs, config, oracle=True)
    (out / "rationale_config_sweep.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = config_sweep_markdown(report)
    (out / "rationale_config_sweep.md").write_text(markdown + "\n")
    print(f"\n## Configuration sweep\n\n{markdown}")
    return report


def run_speed(bundle: Bundle, config: RationaleConfig, out: Path, repeats: int) -> list[dict[str, Any]]:
    from benchmarks.rationale_speed import speed, speed_table

    rows = speed(bundle, config, repeats=repeats)
    (out / "rationale_speed.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n## Speed ({torch.get_num_threads()} threads, {bundle.manifest.resolution} px)\n\n{speed_table(rows)}")
    return rows


def _configs(text: str) -> list[dict[str, Any]]:
    from benchmarks.rationale_sweep import parse_configs

    try:
        return parse_configs(text)
    except (ValueError, TypeError) as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rationale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", nargs="?", choices=("quality", "sweep", "mnist", "speed", "report", "all"),
                        default="all")
    parser.add_argument("--bundle", type=Path, default=None, help="bundle folder (default: the demo bundle)")
    parser.add_argument("--seeds", type=parse_seeds, default=TEST_SEEDS,
                        help="held-out test phantoms A-B (default 900000-900199)")
    parser.add_argument("--validation-seeds", type=parse_seeds, default=VALIDATION_SEEDS,
                        help="phantoms for the lambda sweep, never the test seeds (default 800000-800099)")
    parser.add_argument("--lambdas", default=DEFAULT_LAMBDAS, help=f"sweep values (default {DEFAULT_LAMBDAS})")
    parser.add_argument("--configs", type=_configs, default=None,
                        help="sweep: configurations instead of lambdas, ';' between them, each NAME=VALUE,... "
                             "changes from RationaleConfig's defaults (e.g. 'default;target=0.05;prior_weight=1,"
                             "weight=30'); writes rationale_config_sweep.json")
    parser.add_argument("--weight", type=float, default=None, help="GVR lambda (default: RationaleConfig's)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-rationale"), help="JSON, tables, figures")
    parser.add_argument("--docs", type=Path, default=None,
                        help="also rewrite this file's generated block (and copy the figure next to it)")
    parser.add_argument("--quick", action="store_true", help=f"the first {QUICK_SEEDS} seeds of each range")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch's default)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if set(args.seeds) & set(args.validation_seeds):
        raise SystemExit("--seeds and --validation-seeds overlap: the lambda must be chosen on other phantoms")
    seeds, validation = args.seeds, args.validation_seeds
    if args.quick:
        seeds, validation = seeds[:QUICK_SEEDS], validation[:QUICK_SEEDS]
    lambdas = [float(v) for v in args.lambdas.split(",") if v.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    needs_bundle = args.which in ("quality", "sweep", "speed", "all")
    bundle = load_bundle(args.bundle or default_bundle_path()) if needs_bundle else None
    config = RationaleConfig() if args.weight is None else RationaleConfig(weight=args.weight)
    if bundle is not None and args.which in ("quality", "all"):
        run_quality(bundle, seeds, config, args.out)
    if bundle is not None and args.which == "sweep" and args.configs is not None:
        run_config_sweep(bundle, validation, args.configs, config, args.out)
    elif bundle is not None and args.which in ("sweep", "all"):
        run_sweep(bundle, validation, lambdas, config, args.out)
    if bundle is not None and args.which in ("speed", "all"):
        run_speed(bundle, config, args.out, repeats=1 if args.quick else 3)
    if args.which in ("mnist", "all"):
        from benchmarks.mnist_gvr import mnist_experiment

        mnist_experiment(args.out, quick=args.quick)
    if args.which == "report" and args.docs is None:
        args.docs = Path("docs/rationale.md")
    if args.docs is not None and args.which == "sweep" and args.configs is not None:
        from benchmarks.rationale_report import config_block_from

        config_block_from(args.out, args.docs)  # only its own block: the other tables were not measured
    elif args.docs is not None:
        from benchmarks.rationale_report import report_from

        report_from(args.out, args.docs)
        for source, target, kinds in (
                (args.out / "rationale_quality.png", args.docs.parent / "rationale_quality.png", ("quality", "all")),
                (args.out / "mnist_gvr.png", args.docs.parent / "rationale_mnist.png", ("mnist", "all"))):
            # an --out inside the docs folder already holds the figure under that name
            if source.exists() and args.which in (*kinds, "report") and source.resolve() != target.resolve():
                shutil.copyfile(source, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
