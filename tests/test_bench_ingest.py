"""``make bench-ingest``'s report: the table, the ratios to each peer, and the block it writes into the docs."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.ingest import DOC_BEGIN, DOC_END, NODE_POSTGRES, NODE_SQLITE, Run, report, write_markdown
from benchmarks.ingest_receivers import tree_cpu_seconds


def _runs() -> list[Run]:
    return [
        Run(NODE_SQLITE, 1, 500, 2.0, 1.5),  # 250/s
        Run(NODE_SQLITE, 1, 500, 2.5, 1.5),  # 200/s
        Run(NODE_SQLITE, 1, 500, 1.25, 1.5),  # 400/s: median 250
        Run(NODE_POSTGRES, 1, 500, 5.0, 2.0),  # 100/s
        Run("Orthanc", 1, 500, 2.5, 1.5),  # 200/s
        Run("storescp", 1, 500, 1.0, 0.5),  # 500/s
        Run(NODE_SQLITE, 8, 500, 1.0, 2.0),  # 500/s
        Run("Orthanc", 8, 500, 2.0, 1.0),  # 250/s
    ]


def test_report_rows_and_ratios_per_mode() -> None:
    table = report(_runs(), 500, ["load average 1.00"])
    assert f"| {NODE_SQLITE} | 1 | 250.0 | 250, 200, 400 | 3.00 |" in table
    assert "| storescp | 1 | 500.0 | 500 | 1.00 |" in table
    assert f"| {NODE_SQLITE} / Orthanc | 1.25 | 2.00 |" in table
    assert f"| {NODE_SQLITE} / storescp | 0.50 | - |" in table
    assert f"| {NODE_POSTGRES} / Orthanc | 0.50 | - |" in table
    assert "- load average 1.00" in table


def test_run_refuses_an_empty_run() -> None:
    with pytest.raises(ValueError, match="needs instances"):
        Run("storescp", 1, 0, 1.0, 0.0)


def test_write_markdown_replaces_only_the_block(tmp_path: Path) -> None:
    doc = tmp_path / "bench.md"
    doc.write_text(f"# Title\n\nbefore\n{DOC_BEGIN}\nold table\n{DOC_END}\nafter\n")
    write_markdown(doc, "new table")
    assert doc.read_text() == f"# Title\n\nbefore\n{DOC_BEGIN}\nnew table\n{DOC_END}\nafter\n"
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(ValueError, match="no"):
        write_markdown(tmp_path / "plain.md", "table")


def test_tree_cpu_counts_this_process() -> None:
    busy = sum(range(2_000_000))
    assert busy > 0
    assert tree_cpu_seconds(__import__("os").getpid()) > 0
