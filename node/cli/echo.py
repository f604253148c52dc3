"""``gvr echo AE@host:port``: is the peer there and does it accept us?"""

from __future__ import annotations

import argparse
import logging
import sys

from node.cli.common import HelpFormatter, peer_argument, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gvr echo", description="Send a C-ECHO (DICOM verification) to a peer.",
        formatter_class=HelpFormatter,
    )  # fmt: skip
    parser.add_argument("peer", type=peer_argument, help="AE@host:port, e.g. ORTHANC@127.0.0.1:4242")
    parser.add_argument("--calling-ae", default="GVRSCU", help="our AE title")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # our failure message says it all
    from node.scu import PeerUnreachableError, echo

    try:
        status = echo(args.peer, args.calling_ae, args.timeout)
    except PeerUnreachableError as error:
        print(f"gvr echo: failed: {error}", file=sys.stderr)
        return 1
    print(f"{args.peer}: C-ECHO status 0x{status:04X}{' (success)' if status == 0 else ''}")
    return 0 if status == 0 else 1
