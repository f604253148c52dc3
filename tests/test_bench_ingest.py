"""``make bench-ingest``'s report: the table, the ratios to each peer, and the block it writes into the docs."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.ingest import (
    DOC_BEGIN,
    DOC_END,
    NODE_POSTGRES,
    NODE_SQLITE,
    Run,
    report,
    write_instances,
    write_markdown,
)
from benchmarks.ingest_flushes import KINDS, Flushes, classify, count_flushes
from benchmarks.ingest_receivers import NodeReceiver, tree_cpu_seconds
from tests.peers import require_tool


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


def test_classify_counts_flush_calls_by_kind_of_file(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    folder.mkdir()
    lines = [
        f"101   fdatasync(8<{tmp_path}/storage/dc/c0/dcc08c12>) = 0",
        f"102   fsync(9<{tmp_path}/spool/tmp/abc.part (deleted)>) = 0",
        f"102   fsync(10<{folder}>) = 0",
        f"103   fdatasync(5<{tmp_path}/audit.sqlite3-wal>) = 0",
        f"104   fdatasync(5<{tmp_path}/storage/index>) = 0",
        "104   +++ exited with 0 +++",
        f"105   openat(AT_FDCWD, \"{tmp_path}/x\", O_RDONLY) = 3",
    ]
    assert classify(lines) == {"instance file": 2, "folder": 1, "index / audit DB": 2}


def test_report_lists_each_receivers_flushes() -> None:
    flushes = [Flushes(NODE_SQLITE, 50, {"instance file": 50, "folder": 50, "index / audit DB": 50}),
               Flushes("Orthanc", 50, {"instance file": 50})]  # fmt: skip
    table = report(_runs(), 500, [], flushes)
    assert f"- {NODE_SQLITE}: 3.0 flush calls per instance (1.0 instance file, 1.0 folder, 1.0 index / audit DB)" in table
    assert "- Orthanc: 1.0 flush calls per instance (1.0 instance file, 0.0 folder, 0.0 index / audit DB)" in table


def test_the_node_flushes_file_folder_and_audit_row_for_every_instance(tmp_path: Path) -> None:
    """Acknowledge-only-when-durable seen from outside: strace on a real `gvr node` while dcmtk storescu sends
    counts, per instance, a flush of the stored file, of its study folder's new entry and of the audit DB."""
    require_tool("strace", "strace")
    require_tool("storescu", "dcmtk")
    for folder in ("source", "work"):
        (tmp_path / folder).mkdir()
    files = write_instances(tmp_path / "source", 6)
    flushes = count_flushes(files, NodeReceiver(NODE_SQLITE), tmp_path / "work")
    assert all(flushes.by_kind.get(kind, 0) >= len(files) for kind in KINDS), flushes
