"""The README stays true: its settings table is the settings model, its commands exist."""

from __future__ import annotations

from pathlib import Path

from node.cli.main import COMMANDS
from node.config import settings_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_settings_table_lists_every_setting() -> None:
    """The table between the markers equals the one generated from Settings."""
    text = README.read_text()
    table = text.split("<!-- settings:start -->")[1].split("<!-- settings:end -->")[0].strip()
    assert table == settings_table(), "regenerate: python -c 'from node.config import settings_table; print(settings_table())'"


def test_readme_names_the_two_commands_and_every_gvr_command() -> None:
    """make demo, make test, and each gvr sub-command appear in the README."""
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    for name in COMMANDS:
        assert f"gvr {name}" in text, f"README does not mention gvr {name}"
