"""``gvr export``: write a versioned model bundle from the three training folders."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from node.cli.common import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gvr export", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--generator", type=Path, required=True, help="folder of `gvr train generator`")
    parser.add_argument("--encoder", type=Path, required=True, help="folder of `gvr train encoder`")
    parser.add_argument("--classifier", type=Path, required=True, help="folder of `gvr train classifier`")
    parser.add_argument("--evaluation", type=Path, default=None,
                        help="report.json of `gvr evaluate` (held-out metrics and OOD percentiles)")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    parser.add_argument("--name", required=True, help="bundle name, e.g. demo")
    parser.add_argument("--version", required=True, help="bundle version, e.g. 1.0.0")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from inference.bundle import BundleInvalidError
    from training.export import export_bundle
    from training.progress import CheckpointError

    try:
        evaluation = json.loads(args.evaluation.read_text()) if args.evaluation else None
        manifest = export_bundle(args.generator, args.encoder, args.classifier, args.out, args.name,
                                 args.version, evaluation)
    except (BundleInvalidError, CheckpointError, ValueError, OSError, KeyError) as exc:
        print(f"gvr export: {exc!r}", file=sys.stderr)
        return 2
    print(json.dumps({"bundle": str(args.out), "name": manifest.name, "version": manifest.version,
                      "metrics": manifest.metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
