"""Helpers every ``gvr`` command shares: logging, the --config option, settings, help and argument types."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any

from node import log_hygiene
from node.config import Peer, Settings
from node.config_check import checked_settings

_MARKUP = re.compile(r"``?([^`]+)``?")  # RST literals and markdown code spans in docstrings and help


def strip_markup(text: str) -> str:
    """Help is read in a terminal: ``gvr demo`` and `gvr audit` become gvr demo and gvr audit."""
    return _MARKUP.sub(r"\1", text)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when there is one, never twice, and no markup.

    argparse's own formatter appends "(default: None)" to every option without
    a default, and a second default to help that already names one.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in text.lower():
            return text
        return super()._get_help_string(action)

    def _format_text(self, text: str) -> str:
        return super()._format_text(strip_markup(text))

    def _expand_help(self, action: argparse.Action) -> str:
        return strip_markup(super()._expand_help(action))


def peer_argument(text: str) -> Peer:
    """argparse type for AE@host:port: its error is the sentence Peer.parse wrote."""
    try:
        return Peer.parse(text)
    except ValueError as error:  # pydantic's ValidationError is a ValueError too
        raise argparse.ArgumentTypeError(str(error).splitlines()[0]) from None


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=None, help="TOML settings file (else GVR_CONFIG; GVR_* variables win)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if not verbose else logging.INFO)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # issue 9: peer strings are escaped, library messages and warnings carry no element values
    log_hygiene.install(logging.getLogger().handlers)


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings for a command; ``SettingsError`` (a sentence per problem) when they are unusable.

    ``gvr`` (node.cli.main) prints that error and exits 2, so commands need not catch it.
    """
    config: Any = getattr(args, "config", None)
    return checked_settings(config)
