"""``gvr rerun JOB``: run a job's inference again (after a FAILED job, a new bundle, a lost message).

The job goes back to QUEUED with its counts reset and is published on the
``gpu`` queue; its results are then delivered as for a new job. Refused, with
exit status 2, for a job that does not exist or that a worker holds right now.
"""

from __future__ import annotations

import argparse

from node.cli.common import HelpFormatter, add_config_option, settings_from, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gvr rerun",
        description="Run a job's inference again: QUEUED, published on the gpu queue, then delivered.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("job_id", help="the job's id (gvr audit lists them)")
    add_config_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from node.audit.db import AuditDB, actor_name
    from node.celery_app import make_celery
    from node.job_commands import JobActionRefused, rerun_job
    from node.spool import Spool

    settings = settings_from(args)
    audit = AuditDB(settings.audit_url)
    try:
        print(rerun_job(audit, make_celery(settings), Spool(settings.spool_dir, owner="cli"), args.job_id,
                        actor_name("cli")))  # fmt: skip
    except JobActionRefused as refused:
        print(f"gvr rerun: {refused}")
        return 2
    finally:
        audit.dispose()
    return 0
