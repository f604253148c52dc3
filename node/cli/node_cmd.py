"""``gvr node``: run the storage SCP and the study assembler until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import threading

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from node.cli.common import HelpFormatter, add_config_option, settings_from, setup_logging
from node.cli.db import safe_url
from node.config import Settings

log = logging.getLogger("gvr.node")
_BIND_ERRNOS = (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL)


def bind_error_message(error: OSError, settings: Settings) -> str:
    """An error binding the SCP's socket, naming the address, the port and the settings to change."""
    where = f"{settings.bind_address}:{settings.port}"
    if error.errno == errno.EADDRINUSE:
        return (f"port {settings.port} on {settings.bind_address} is already in use (setting port, GVR_PORT): "
                f"stop the program holding it (ss -ltnp 'sport = :{settings.port}') or choose another port")
    if error.errno == errno.EACCES:
        return (f"no permission to listen on {where}: ports below 1024 need root or CAP_NET_BIND_SERVICE "
                "(setting port, GVR_PORT)")
    if error.errno == errno.EADDRNOTAVAIL:
        return (f"{settings.bind_address} is not an address of this host (setting bind_address, "
                "GVR_BIND_ADDRESS): use 0.0.0.0 for all addresses or 127.0.0.1")
    return f"{where}: {error}"


def first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gvr node",
        description="Receive studies by C-STORE, audit them, and queue complete studies for inference. "
        "Settings come from GVR_* variables and the optional TOML file (see the README).",
        formatter_class=HelpFormatter,
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
    try:
        service = NodeService(settings)
    except SQLAlchemyError as error:
        log.error("cannot open the audit DB %s: %s", safe_url(settings.audit_url), first_line(error))
        return 1
    try:
        service.run_until(stop)
    except OSError as error:
        log.error("cannot start the node: %s", bind_error_message(error, settings))
        return 2 if error.errno in _BIND_ERRNOS else 1
    except ServiceThreadDiedError as error:
        log.critical("node stopped: %s; exiting 3 so that the service manager restarts it", error)
        return 3
    log.info("node stopped")
    return 0
