"""Helpers every ``gvr`` command shares: logging, the --config option, settings."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from node import log_hygiene
from node.config import Settings, load_settings


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
    return load_settings(args.config)
