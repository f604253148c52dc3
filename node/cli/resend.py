"""``gvr resend JOB``: deliver a job's results again (after a FAILED delivery, or to another PACS).

By default the job goes back on the ``dicom`` queue for a worker; ``--now``
delivers in this process, once, and prints what each destination answered.
Result UIDs are deterministic, so a resend never makes a second copy in a PACS.
"""

from __future__ import annotations

import argparse

from node.cli.common import HelpFormatter, add_config_option, peer_argument, settings_from, setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gvr resend",
        description="Deliver the result objects (SC and SR) of an INFERRED or FAILED job again.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("job_id", help="the job's id (gvr audit lists them)")
    how = parser.add_argument_group("how")
    how.add_argument("--now", action="store_true", help="deliver in this process instead of queueing it")
    how.add_argument(
        "--to", dest="destinations", action="append", type=peer_argument, default=None,
        help="AE@host:port, repeatable; with --now only (default: the configured destinations)",
    )  # fmt: skip
    how.add_argument(
        "--force", action="store_true", help="also resend a job that is already SENT (with --now)"
    )
    add_config_option(parser)
    return parser


def _queue(job_id: str, args: argparse.Namespace) -> int:
    from node.audit.db import AuditDB, actor_name
    from node.celery_app import make_celery
    from node.job_commands import JobActionRefused, resend_job

    settings = settings_from(args)
    audit = AuditDB(settings.audit_url)
    try:
        print(resend_job(audit, make_celery(settings), job_id, actor_name("cli")))
    except JobActionRefused as refused:
        print(f"gvr resend: {refused}")
        return 2
    finally:
        audit.dispose()
    return 0


def _now(job_id: str, args: argparse.Namespace) -> int:
    from node.delivery import DeliveryContext, DeliveryError, DeliveryRefusedError, deliver_job, fail_job

    ctx = DeliveryContext.load(settings_from(args), "resend")
    try:
        report = deliver_job(ctx, job_id, destinations=args.destinations, force=args.force)
    except DeliveryRefusedError as refused:
        print(f"gvr resend: {refused}")
        return 2
    except DeliveryError as error:
        fail_job(ctx, job_id, str(error))
        print(f"job {job_id}: delivery failed: {error}")
        return 1
    finally:
        ctx.audit.dispose()
    if not report.outcomes:
        print(f"job {job_id} is already SENT (use --force to send it again)")
        return 0
    for outcome in report.outcomes:
        state = (
            "already held everything" if outcome.skipped else f"{outcome.sent} sent, {outcome.failed} failed"
        )
        print(f"{outcome.destination}: {state}")
    print(f"job {job_id}: SENT ({len(report.objects)} object(s), attempt {report.attempt})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.destinations and not args.now:
        print("--to needs --now: a queued delivery goes to the configured destinations")
        return 2
    return _now(args.job_id, args) if args.now else _queue(args.job_id, args)
