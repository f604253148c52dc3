"""``gvr demo``: phantom studies in by C-STORE, predictions and rationales out to a PACS.

Runs on the embedded default: SQLite audit DB, a SQLite Celery broker, the node and
a worker started by this command, Orthanc as the receiving PACS when installed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from node.cli.common import HelpFormatter, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gvr demo", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--studies", type=int, default=4, help="phantom studies to send (half positive)")
    parser.add_argument("--out", type=Path, default=None, help="folder for everything (default gvr-data/demo-<time>)")
    parser.add_argument("--timeout", type=float, default=100.0, help="seconds to wait for all results")
    parser.add_argument(
        "--keep", action="store_true",
        help="leave Orthanc and the review page (gvr web) running afterwards, and print their URLs",
    )  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.studies < 1:
        raise SystemExit("gvr demo: --studies must be at least 1")
    setup_logging(args.verbose)
    import logging

    if not args.verbose:
        logging.getLogger().setLevel(logging.WARNING)
    from node.demo.run import run_demo

    folder = args.out or Path("gvr-data") / time.strftime("demo-%Y%m%d-%H%M%S")
    print(f"gvr demo: everything goes to {folder.resolve()}")
    return run_demo(folder.resolve(), args.studies, args.timeout, keep=args.keep)
