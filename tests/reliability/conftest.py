"""Fixtures of the reliability suite, and the summary of its figures at the end of the run.

Sizes are chosen so the whole suite stays within a few minutes on two cores;
every figure it asserts on is also printed (``FIGURES``), so a reader sees what
was really exercised, not just "passed".
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.harness import FIGURES, RestartableRedis


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES == type(FIGURES)():
        return  # no reliability scenario ran
    terminalreporter.section("reliability suite figures")
    for line in FIGURES.lines():
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``GVR_TEST_BUNDLE=DIR``, else a tiny bundle trained here (~20 s: 32 px, latent 16, 8 channels).

    Tiny even when a demo bundle is committed: the suite measures the plumbing, not the model,
    and a small model keeps 45 jobs within CI's budget. ``GVR_TEST_BUNDLE=train`` also trains.
    """
    given = os.environ.get("GVR_TEST_BUNDLE", "")
    if given and given != "train":
        return Path(given)
    import torch

    from tests.inference.conftest import _train_tiny_bundle

    before = torch.get_num_threads()
    try:
        return _train_tiny_bundle(tmp_path_factory.mktemp("reliability-bundle"))
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RestartableRedis]:
    """A ``redis-server`` of this test's own (append-only file on), so restarting it touches nothing else."""
    server = RestartableRedis(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()
