"""``gvr node``: run the storage SCP and the study assembler until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from pydantic import ValidationError

from node.cli.common import add_config_option, settings_from, setup_logging

log = logging.getLogger("gvr.node")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gvr node",
        description="Receive studies by C-STORE, audit them, and queue complete studies for inference. "
        "Settings come from GVR_* variables and the optional TOML file (see the README).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        settings = settings_from(args)
    except (ValidationError, FileNotFoundError) as error:
        log.error("invalid settings: %s", error)
        return 2
    from node.service import NodeService
    from node.supervision import ServiceThreadDiedError

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    service = NodeService(settings)
    try:
        service.run_until(stop)
    except OSError as error:
        log.error("cannot start the node: %s", error)
        return 1
    except ServiceThreadDiedError as error:
        log.critical("node stopped: %s; exiting 3 so that the service manager restarts it", error)
        return 3
    log.info("node stopped")
    return 0
