"""``gvr monitor``: Flower, the Celery web monitor, against the node's broker.

Flower shows the workers (alive, pool, processed counts) and every task of the
``gpu`` and ``dicom`` queues with its state and runtime; it needs the Redis
broker (its broadcasts) and workers sending task events, which ``make_celery``
turns on for Redis. The command only builds the ``celery flower`` command line
from the settings and replaces itself with it, so signals reach Flower
directly. The same thing by hand::

    celery --broker=redis://127.0.0.1:6379/0 flower --address=127.0.0.1 --port=5555

Flower comes with the optional extra: ``pip install '.[monitor]'`` from the repository.

No secret in argv or logs (issue 11): the basic-auth ``user:password`` comes
from ``FLOWER_BASIC_AUTH`` (Flower's own variable) or ``--basic-auth-file``, and
reaches Flower through its environment, which other users cannot read (the
process list shows argv to everyone).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

from node.broker_stats import redacted
from node.cli.common import HelpFormatter, add_config_option, settings_from, setup_logging

log = logging.getLogger("gvr.monitor")
AUTH_VARIABLE = "FLOWER_BASIC_AUTH"  # Flower reads it itself


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
        "--basic-auth-file", type=Path, default=None, metavar="PATH",
        help="file holding USER:PASSWORD for HTTP basic auth (else the FLOWER_BASIC_AUTH variable); "
        "required whenever --address is not loopback",
    )  # fmt: skip
    parser.add_argument("--basic-auth", help=argparse.SUPPRESS)  # refused: it would show in the process list
    parser.add_argument("--print-command", action="store_true", help="print the celery command and exit")
    return parser


def flower_command(broker_url: str, address: str, port: int) -> list[str]:
    """The ``celery ... flower`` command line for these options (never a password)."""
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid port {port}: expected 1-65535")
    return [sys.executable, "-m", "celery", f"--broker={broker_url}", "flower",
            f"--address={address}", f"--port={port}"]  # fmt: skip


def basic_auth(path: Path | None, environ: Mapping[str, str]) -> str | None:
    """USER:PASSWORD from the file, else FLOWER_BASIC_AUTH; None when neither is set."""
    if path is not None:
        try:
            value: str | None = path.read_text().strip()
        except OSError as error:
            raise ValueError(f"cannot read --basic-auth-file {path}: {error.strerror}") from None
        origin = f"--basic-auth-file {path}"
    else:
        value, origin = environ.get(AUTH_VARIABLE) or None, AUTH_VARIABLE
    if value is not None and any(":" not in pair for pair in value.split(",")):
        raise ValueError(f"invalid {origin}: expected USER:PASSWORD")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.basic_auth is not None:
        log.error("--basic-auth would put the password in the process list: put USER:PASSWORD in %s "
                  "or in a file named by --basic-auth-file", AUTH_VARIABLE)  # fmt: skip
        return 2
    settings = settings_from(args)
    try:
        command = flower_command(settings.celery_broker_url, args.address, args.port)
        auth = basic_auth(args.basic_auth_file, os.environ)
    except ValueError as error:
        log.error("%s", error)
        return 2
    shown = [*command[:3], f"--broker={redacted(settings.celery_broker_url)}", *command[4:]]  # no password
    if args.print_command:
        print(shlex.join(shown))
        return 0
    if auth is None and args.address not in ("127.0.0.1", "localhost", "::1"):
        log.error("Flower on %s without basic auth: set %s or --basic-auth-file", args.address, AUTH_VARIABLE)
        return 2
    if not settings.celery_broker_url.startswith(("redis://", "rediss://")):
        log.warning("Flower needs broadcast and events, which the SQLite broker lacks: use Redis (GVR_BROKER_URL)")
    if importlib.util.find_spec("flower") is None:
        log.error("flower is not installed: pip install '.[monitor]' in the gvr-node repository")
        return 1
    environment = dict(os.environ)
    if auth is not None:
        environment[AUTH_VARIABLE] = auth
    log.info("starting Flower on http://%s:%d (%s; basic auth %s)", args.address, args.port, shlex.join(shown),
             "on" if auth else "off")  # fmt: skip
    os.execve(command[0], command, environment)  # replaces this process; returns only on failure (OSError)
    return 1  # pragma: no cover
