"""``gvr send PATH... --to AE@host:port``: C-STORE files or folders to a peer."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from node.cli.common import HelpFormatter, peer_argument, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gvr send",
        description="C-STORE DICOM files (folders are searched recursively), one presentation context "
        "per SOP class and transfer syntax found, so nothing is transcoded.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("paths", nargs="+", type=Path, help="files or folders")
    parser.add_argument("--to", dest="peer", required=True, type=peer_argument, help="AE@host:port")
    parser.add_argument("--calling-ae", default="GVRSCU", help="our AE title")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per network operation")
    return parser


def _expand(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        found.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # our failure message says it all
    from node.scu import FileToSend, PeerUnreachableError, send_files

    files, unreadable = [], 0
    for path in _expand(args.paths):
        try:
            files.append(FileToSend.read(path))
        except ValueError as error:
            print(f"skipped: {error}")
            unreadable += 1
    try:
        results = send_files(files, args.peer, args.calling_ae, args.timeout)
    except PeerUnreachableError as error:
        print(f"gvr send: failed: {error}", file=sys.stderr)
        return 1
    failed = [r for r in results if not r.ok]
    for result in failed:
        status = "no response" if result.status is None else f"0x{result.status:04X}"
        print(f"FAILED {result.path}: {status} {result.error or ''}".rstrip())
    print(f"sent {len(results) - len(failed)} of {len(results)} file(s) to {args.peer}; {unreadable} unreadable")
    return 0 if not failed and not unreadable else 1
