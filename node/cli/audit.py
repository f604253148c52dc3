"""``gvr audit``: what the node received, assembled, ran and sent, from the audit database.

Read-only: it never creates or migrates the database. Tables for people,
``--json`` for scripts (one object with four lists, datetimes ISO 8601 UTC).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from sqlalchemy import inspect
from sqlalchemy.exc import SQLAlchemyError

from node.cli.common import HelpFormatter, add_config_option, settings_from, setup_logging

log = logging.getLogger("gvr.audit")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid limit {text!r}: expected 1 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gvr audit",
        description="Show recent associations, studies (instance counts by status), jobs and events "
        "from the audit database the settings name. Patient names are never shown.",
        formatter_class=HelpFormatter,
    )
    scope = parser.add_argument_group("what to show")
    scope.add_argument("--limit", type=_positive, default=20, help="newest rows per list")
    scope.add_argument("--study", metavar="UID", default=None, help="only this StudyInstanceUID")
    scope.add_argument("--job", metavar="ID", default=None, help="only this job (and its study)")
    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    add_config_option(parser)
    return parser


def _has_schema(url: str) -> bool:
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return False  # do not create an empty file by looking
    from node.audit.db import make_engine

    engine = make_engine(url)
    try:
        return inspect(engine).has_table("events")
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from node.audit.report import AuditQuery, UnknownJobError, collect
    from node.cli.db import safe_url

    url = settings_from(args).audit_url
    try:
        query = AuditQuery(limit=args.limit, study_uid=args.study, job_id=args.job)
    except ValueError as error:
        print(f"gvr audit: {error}", file=sys.stderr)
        return 2
    try:
        if not _has_schema(url):
            log.error("audit database %s has no tables yet: run `gvr db upgrade`", safe_url(url))
            return 1
        from node.audit.db import AuditDB

        audit = AuditDB(url)
        try:
            with audit.session() as session:
                report = collect(session, query)
        finally:
            audit.dispose()
    except UnknownJobError as error:
        log.error("%s", error)
        return 1
    except SQLAlchemyError as error:
        log.error("audit database %s: %s", safe_url(url), error)
        return 1
    try:
        print(report.json_text() if args.json else report.render(), flush=True)
    except BrokenPipeError:  # `gvr audit | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
