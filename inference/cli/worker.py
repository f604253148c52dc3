"""``gvr worker``: a Celery worker for the ``gpu`` queue (and ``dicom``, when delivery is installed).

A thin wrapper over ``celery worker``: it builds the app from the node's settings,
includes the task modules this install has, and passes the pool options through.
One job at a time per device is the default: a GPU (or this CPU) is saturated by
one batch. Options that settings also hold (``--device``, ``--bundle``,
``--config``) are exported as ``GVR_*`` variables, so a forked pool process that
re-reads the settings sees the same values.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from node.cli.common import HelpFormatter, setup_logging

log = logging.getLogger("gvr.worker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gvr worker",
        description="Run a Celery worker: queue gpu runs inference.analyze_study, queue dicom "
        "node.deliver_results. Settings come from GVR_* variables and the optional TOML file.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=None, help="TOML settings file (exported as GVR_CONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    worker = parser.add_argument_group("worker")
    worker.add_argument("--queues", "-Q", default="gpu", help="comma-separated queues to consume: gpu, dicom")
    worker.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device for the models (exported as GVR_DEVICE); default: the settings' device")
    worker.add_argument("--bundle", type=Path, default=None,
                        help="model bundle folder (exported as GVR_BUNDLE_DIR); default: settings, else the demo")
    worker.add_argument("--concurrency", "-c", type=int, default=1, help="pool processes (1 per device)")
    worker.add_argument("--pool", choices=("prefork", "solo", "threads"), default="prefork",
                        help="solo runs jobs in the worker process itself (no fork)")
    worker.add_argument("--hostname", "-n", default=f"gvr-worker-{os.getpid()}@{socket.gethostname()}",
                        help="Celery node name")
    worker.add_argument("--visibility-timeout", type=float, default=None,
                        help="Redis only: seconds before an unacknowledged job goes to another worker "
                        "(default 3600; keep it above the longest job)")
    rationale = parser.add_argument_group("rationale (defaults: inference.rationale.RationaleConfig)")
    rationale.add_argument("--max-steps", type=int, default=None, help="latent optimisation steps at most")
    rationale.add_argument("--target", type=float, default=None,
                           help="stop below this probability (default: half the decision threshold)")
    rationale.add_argument("--weight", type=float, default=None, help="lambda: weight of the image distance")
    return parser


def _export_settings(args: argparse.Namespace) -> None:
    """Put the options that are settings into the environment every pool process inherits."""
    for name, value in (("GVR_CONFIG", args.config), ("GVR_DEVICE", args.device), ("GVR_BUNDLE_DIR", args.bundle)):
        if value is not None:
            os.environ[name] = str(Path(value).resolve()) if isinstance(value, Path) else str(value)
    # issue 11: the audit names a worker as Flower does, by its Celery node name (node.audit.db.actor_name)
    from celery.utils.nodenames import host_format

    from node.audit.db import WORKER_NODENAME_VARIABLE

    args.hostname = host_format(args.hostname)
    os.environ[WORKER_NODENAME_VARIABLE] = args.hostname


def _rationale_options(args: argparse.Namespace) -> dict[str, object]:
    chosen = {"max_steps": args.max_steps, "target": args.target, "weight": args.weight}
    return {name: value for name, value in chosen.items() if value is not None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.concurrency < 1:
        log.error("--concurrency must be >= 1, got %d", args.concurrency)
        return 2
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    if not queues or any(q not in ("gpu", "dicom") for q in queues):
        log.error("--queues must name gpu and/or dicom, got %r", args.queues)
        return 2
    _export_settings(args)
    from node.config_check import checked_settings

    try:
        settings = checked_settings()  # issue 11: misspelt GVR_* variables refused, errors as sentences
        from inference.rationale import RationaleConfig

        rationale = _rationale_options(args)
        RationaleConfig(**rationale)  # type: ignore[arg-type]
    except (ValidationError, ValueError, FileNotFoundError) as error:
        log.error("invalid settings: %s", error)
        return 2
    from inference.worker_app import make_worker_app, task_modules_for

    if "gpu" in queues:
        # issue 11: a worker that cannot load its bundle on its device refuses to start, with the reason
        from inference.bundle import BundleInvalidError
        from inference.predict import resolve_bundle

        try:
            resolve_bundle(settings.bundle_dir, settings.device)
        except (BundleInvalidError, FileNotFoundError, RuntimeError) as error:
            log.error("cannot start: the gpu worker cannot load its model bundle on %s: %s", settings.device, error)
            return 2
    modules = task_modules_for(queues)
    app = make_worker_app(settings, args.visibility_timeout, rationale, modules)
    log.info("worker %s: queues %s, pool %s x%d, device %s, tasks from %s", args.hostname, ",".join(queues),
             args.pool, args.concurrency, settings.device, ", ".join(modules))
    return run_worker(app, ["worker", "--queues", ",".join(queues), "--pool", args.pool, "--concurrency",
                            str(args.concurrency), "--hostname", args.hostname,
                            "--loglevel", "DEBUG" if args.verbose else "INFO", "--without-gossip",
                            "--without-mingle"])  # fmt: skip


def run_worker(app: Any, argv: list[str]) -> int:
    """Run Celery's worker and return its exit status.

    ``Celery.worker_main`` drops it: a worker that stopped on an "Unrecoverable error"
    (say, after a broker restart) ended ``gvr worker`` with status 0, so nothing showed
    it had failed. The status is the worker's own (``WorkController.exitcode``), read
    from the ``worker_shutdown`` signal.
    """
    from celery.signals import worker_shutdown

    codes: list[int] = []

    def remember(sender: Any = None, **_: Any) -> None:
        codes.append(int(getattr(sender, "exitcode", None) or 0))

    worker_shutdown.connect(remember, weak=False)
    try:
        app.worker_main(argv)
    finally:
        worker_shutdown.disconnect(remember)
    return max(codes, default=0)
