"""``gvr db``: audit database maintenance (``upgrade`` to a revision, show the ``current`` one).

The URL comes from the settings (``GVR_DATABASE_URL``, else the SQLite file in
the data folder), so the command migrates exactly the database the node uses.
Upgrading is idempotent: run it before every start, e.g. in a deploy script.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from node.cli.common import HelpFormatter, add_config_option, settings_from, setup_logging

log = logging.getLogger("gvr.db")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gvr db",
        description="Audit database maintenance. The database is the one the settings name "
        "(GVR_DATABASE_URL, else <data_dir>/audit.sqlite3).",
        formatter_class=HelpFormatter,
    )
    commands = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    upgrade = commands.add_parser(
        "upgrade", help="create or migrate the schema (idempotent)",
        formatter_class=HelpFormatter,
    )  # fmt: skip
    upgrade.add_argument("--revision", default="head", help="Alembic revision to upgrade to")
    add_config_option(upgrade)
    current = commands.add_parser(
        "current", help="print the schema revision of the database",
        formatter_class=HelpFormatter,
    )  # fmt: skip
    current.add_argument("--check", action="store_true", help="exit 1 unless the database is at head")
    add_config_option(current)
    return parser


def safe_url(url: str) -> str:
    """The URL with any password masked, fit for a log line."""
    return make_url(url).render_as_string(hide_password=True)


def head_revision(url: str) -> str | None:
    """The newest revision the migrations shipped with this version define."""
    from alembic.script import ScriptDirectory

    from node.audit.migrate import alembic_config

    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def read_revision(url: str) -> str | None:
    """The database's revision; None when it is empty or (SQLite) its file does not exist yet."""
    from node.audit.migrate import current_revision

    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return None  # reading must not create the file
    return current_revision(url)


def _describe(revision: str | None, head: str | None) -> str:
    if revision is None:
        return "none (empty database: run `gvr db upgrade`)"
    if revision == head:
        return f"{revision} (head)"
    return f"{revision} (head is {head}: run `gvr db upgrade`)"


def _upgrade(url: str, revision: str) -> int:
    from node.audit.migrate import upgrade

    before = read_revision(url)
    upgrade(url, revision)
    after = read_revision(url)
    if before == after:
        print(f"audit database {safe_url(url)} already at {_describe(after, head_revision(url))}")
    else:
        print(f"audit database {safe_url(url)} upgraded from {before or 'empty'} to {after}")
    return 0


def _current(url: str, check: bool) -> int:
    revision, head = read_revision(url), head_revision(url)
    print(_describe(revision, head))
    return 1 if check and revision != head else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        url = settings_from(args).audit_url
    except (ValidationError, FileNotFoundError) as error:
        log.error("invalid settings: %s", error)
        return 2
    try:
        if args.action == "upgrade":
            return _upgrade(url, args.revision)
        return _current(url, args.check)
    except SQLAlchemyError as error:
        log.error("audit database %s: %s", safe_url(url), error)
        return 1
