"""Rebuild README.md from its parts: the intro here, the settings table, and docs/*.md sections.

The docs are the detailed references; the README carries the sections a new user and an IT
engineer need (two commands, settings, deployment, model card, phantoms), and links the rest.
Run: .venv/bin/python scripts/build-readme.py
"""

from __future__ import annotations

import re
from pathlib import Path

from node.config import settings_table

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def section(name: str, level: int = 2) -> str:
    """A docs file as a README section: headings pushed to ``level``, links made relative to the root."""
    text = (DOCS / name).read_text().strip()
    top = min(len(m) for m in re.findall(r"^(#+) ", text, flags=re.MULTILINE))
    shift = level - top
    text = re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + shift) + " ", text, flags=re.MULTILINE)
    return re.sub(r"\]\((?!http|#|docs/)([^)]+\.(?:png|md|gif))\)", r"](docs/\1)", text)


def main() -> None:
    intro = (ROOT / "scripts" / "readme-intro.md").read_text().strip()
    parts = [
        intro.replace("{{SETTINGS}}", "<!-- settings:start -->\n" + settings_table() + "\n<!-- settings:end -->"),
        section("deployment.md"),
        section("model-card.md"),
        section("phantoms.md"),
        section("audit.md"),
        (ROOT / "scripts" / "readme-outro.md").read_text().strip(),
    ]
    (ROOT / "README.md").write_text("\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
