"""``gvr monitor``: Flower, the Celery web monitor, against the node's broker.

Flower shows the workers (alive, pool, processed counts) and every task of the
``gpu`` and ``dicom`` queues with its state and runtime; it needs the Redis
broker (its broadcasts) and workers sending task events, which ``make_celery``
turns on for Redis. The command only builds the ``celery flower`` command line
from the settings and replaces itself with it, so signals reach Flower
directly. The same thing by hand::

    celery --broker=redis://127.0.0.1:6379/0 flower --address=127.0.0.1 --port=5555

Flower comes with the optional extra: ``pip install 'gvr-node[monitor]'``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shlex
import sys

from pydantic import ValidationError

from node.cli.common import HelpFormatter, add_config_option, settings_from, setup_logging
from node.cli.status import redacted

log = logging.getLogger("gvr.monitor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gvr monitor",
        description="Run Flower (Celery's web monitor) against the broker in the settings: workers, "
        "queues and every task. Needs the Redis broker and the 'monitor' extra (flower).",
        formatter_class=HelpFormatter,
    )
    add_config_option(parser)
    parser.add_argument("--address", default="127.0.0.1", help="address Flower listens on")
    parser.add_argument("--port", type=int, default=5555, help="HTTP port of Flower")
    parser.add_argument(
        "--basic-auth", default=None, metavar="USER:PASSWORD",
        help="require HTTP basic auth (do this whenever --address is not loopback)",
    )  # fmt: skip
    parser.add_argument("--print-command", action="store_true", help="print the celery command and exit")
    return parser


def flower_command(broker_url: str, address: str, port: int, basic_auth: str | None) -> list[str]:
    """The ``celery ... flower`` command line for these options."""
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid port {port}: expected 1-65535")
    if basic_auth is not None and ":" not in basic_auth:
        raise ValueError("invalid --basic-auth: expected USER:PASSWORD")
    command = [sys.executable, "-m", "celery", f"--broker={broker_url}", "flower",
               f"--address={address}", f"--port={port}"]  # fmt: skip
    if basic_auth is not None:
        command.append(f"--basic-auth={basic_auth}")
    return command


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        settings = settings_from(args)
        command = flower_command(settings.celery_broker_url, args.address, args.port, args.basic_auth)
    except (ValidationError, FileNotFoundError, ValueError) as error:
        log.error("%s", error)
        return 2
    shown = [*command[:3], f"--broker={redacted(settings.celery_broker_url)}", *command[4:]]  # no password
    if args.print_command:
        print(shlex.join(shown))
        return 0
    if not settings.celery_broker_url.startswith(("redis://", "rediss://")):
        log.warning("Flower needs broadcast and events, which the SQLite broker lacks: use Redis (GVR_BROKER_URL)")
    if importlib.util.find_spec("flower") is None:
        log.error("flower is not installed: pip install 'gvr-node[monitor]'")
        return 1
    log.info("starting Flower on http://%s:%d (%s)", args.address, args.port, shlex.join(shown))
    os.execv(command[0], command)  # replaces this process; returns only on failure (raises OSError)
    return 1  # pragma: no cover
