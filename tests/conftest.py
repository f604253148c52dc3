"""Shared fixtures: real peers (PostgreSQL, Redis, Orthanc, dcmtk, ``gvr node``) on free ports.

Each fixture starts or borrows the real thing and leaves nothing behind: its
own database, its own Redis DB index, its own Orthanc folder, processes stopped.
A missing tool skips the test with the install command. Set
``GVR_TEST_PRIVATE_PEERS=1`` to ignore the servers on 5432/6379 and start
private ones (what a machine without them does anyway).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Imported here, at a shallow stack, on purpose: hypothesis's pytest plugin imports the package
# lazily in its terminal summary, deep in pluggy's stack, where CPython 3.11.7's assertion-rewrite
# parse fails ("SystemError: AST constructor recursion depth mismatch", fixed in 3.11.8) and turns
# a green run into exit status 1.
import hypothesis  # noqa: F401
import pytest

from tests.peers import (
    LOOPBACK,
    DicomTestFile,
    free_port,
    pydicom_test_files,
    require_tool,
    run_storescu,
    start_process,
    stop_process,
    wait_for_port,
)
from tests.peers_orthanc import Orthanc
from tests.peers_servers import (
    PostgresServer,
    PrivatePostgres,
    claim_redis_db,
    find_postgres,
    redis_answers,
    release_redis_db,
    start_private_redis,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _private_peers() -> bool:
    return os.environ.get("GVR_TEST_PRIVATE_PEERS", "") not in ("", "0")


@pytest.fixture
def settings_env(tmp_path: Path) -> dict[str, str]:
    """``GVR_*`` variables for a node under test: data in tmp_path/data, a free port on 127.0.0.1.

    A plain dict: pass it to ``node_process`` or ``monkeypatch.setenv`` it for an
    in-process ``load_settings()``. Change a value before use to vary the node.
    """
    return {
        "GVR_DATA_DIR": str(tmp_path / "data"),
        "GVR_PORT": str(free_port()),
        "GVR_BIND_ADDRESS": LOOPBACK,
        "GVR_AE_TITLE": "GVRNODE",
        "GVR_ALLOWED_CALLING_AETS": "STORESCU,ORTHANC,GVRSCU,GVRTEST",
        "GVR_STUDY_STABLE_SECONDS": "1",
    }


# -- PostgreSQL ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The PostgreSQL at 127.0.0.1:5432 (trust auth), or a private cluster started for this session.

    Skips with "apt-get install postgresql" when neither is possible.
    """
    server = None if _private_peers() else find_postgres(LOOPBACK, 5432)
    if server is not None:
        yield server
        return
    private = PrivatePostgres()
    try:
        yield private.start()
    finally:
        private.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A SQLAlchemy URL (postgresql+psycopg2) of an empty database of this test's own.

    Named ``gvr_test_<hex>``; dropped afterwards, leftover connections terminated
    first. No migrations applied: call ``node.audit.migrate.upgrade(url)``.
    """
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def audit_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty audit database URL, once on SQLite (a file in tmp_path) and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    return str(request.getfixturevalue("postgres_url"))


# -- Redis -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """(host, port) of the Redis at 127.0.0.1:6379 when it answers PING, else of a private one.

    The private ``redis-server`` keeps nothing on disk and is stopped after the
    session; skips with "apt-get install redis-server" when it is missing.
    """
    if not _private_peers() and redis_answers(LOOPBACK, 6379):
        yield LOOPBACK, 6379
        return
    process, port = start_private_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield LOOPBACK, port
    finally:
        stop_process(process)


@pytest.fixture
def redis_url(redis_server: tuple[str, int]) -> Iterator[str]:
    """``redis://127.0.0.1:<port>/<n>``: a DB index that was empty, claimed for this test.

    The DB holds one marker key, ``gvr-test:claimed-by``. Afterwards the keys
    left in it and the marker are deleted (never FLUSHDB/FLUSHALL).
    """
    host, port = redis_server
    index, token = claim_redis_db(host, port)
    try:
        yield f"redis://{host}:{port}/{index}"
    finally:
        release_redis_db(host, port, index, token)


# -- Orthanc and dcmtk -------------------------------------------------------------------------------


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A private Orthanc (AET ORTHANC) on free DICOM and HTTP ports, config and storage in tmp_path.

    Yields ``tests.peers_orthanc.Orthanc``: ``.dicom_port``, ``.http_port``, ``.url``,
    ``.aet``, ``add_modality``, ``upload``, ``store_to``, ``find_instances``,
    ``instance_tags``, ``studies``, ``request``. Shut down through REST after the
    test (killed after 10 s). Skips with "apt-get install orthanc" when missing.
    """
    server = Orthanc(tmp_path / "orthanc")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def storescu() -> Callable[..., Any]:
    """``tests.peers.run_storescu`` (dcmtk's storescu with TCP_NODELAY=1); skips without dcmtk."""
    require_tool("storescu", "dcmtk")
    return run_storescu


@pytest.fixture(scope="session")
def dicom_test_files() -> list[DicomTestFile]:
    """``tests.peers.pydicom_test_files()``: bundled single-frame images, several transfer syntaxes."""
    return pydicom_test_files()


# -- gvr node as a real process ----------------------------------------------------------------------


@dataclass
class NodeProcess:
    """A running ``gvr node``: its process, port, data folder and log file."""

    popen: Any
    port: int
    data_dir: Path
    log_path: Path
    env: dict[str, str] = field(repr=False)

    def log(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait ``timeout`` s, then SIGKILL; returns the exit status."""
        return stop_process(self.popen, timeout)


@pytest.fixture
def node_process(tmp_path: Path, settings_env: dict[str, str]) -> Iterator[Callable[..., NodeProcess]]:
    """Factory: ``start(env=None, timeout=30) -> NodeProcess`` runs ``python -m node.cli.main node``.

    The environment is this one without any ``GVR_*``, plus ``settings_env``,
    plus ``env``. A second start in one test gets a fresh port unless ``env``
    names ``GVR_PORT`` (same data folder: a restart). Waits for the port to
    open; if the process dies first, raises with the log's tail. Output goes to
    ``tmp_path/node-<n>.log``. Every node still running is stopped at teardown
    (SIGTERM, 10 s, SIGKILL).
    """
    started: list[NodeProcess] = []

    def start(env: Mapping[str, str] | None = None, timeout: float = 30.0) -> NodeProcess:
        full = {k: v for k, v in os.environ.items() if not k.startswith("GVR_")}
        full.update(settings_env)
        if started:
            full["GVR_PORT"] = str(free_port())
        full.update(env or {})
        full.setdefault("PYTHONUNBUFFERED", "1")
        port = int(full["GVR_PORT"])
        log_path = tmp_path / f"node-{len(started) + 1}.log"
        popen = start_process([sys.executable, "-m", "node.cli.main", "node"], log_path, full, cwd=REPO_ROOT)
        node = NodeProcess(popen, port, Path(full["GVR_DATA_DIR"]), log_path, full)
        started.append(node)
        wait_for_port(LOOPBACK, port, timeout, process=popen, log=log_path)
        return node

    yield start
    for node in started:
        node.stop()
