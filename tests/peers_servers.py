"""PostgreSQL and Redis for tests: borrow the local server, or start a private one.

Each test gets a database (``gvr_test_<hex>``) or a Redis DB index of its own
and leaves nothing behind. Used by the fixtures in ``tests/conftest.py``.
"""

from __future__ import annotations

import getpass
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.peers import (
    LOOPBACK,
    PeerStartError,
    free_port,
    port_answers,
    require_tool,
    start_process,
    wait_for_port,
)

# -- PostgreSQL ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PostgresServer:
    """A PostgreSQL server we may create databases on (trust authentication)."""

    host: str
    port: int
    user: str
    maintenance_db: str

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of ``database`` on this server."""
        return f"postgresql+psycopg2://{self.user}@{self.host}:{self.port}/{database}"

    def _connect(self) -> Any:
        import psycopg2

        connection = psycopg2.connect(
            host=self.host, port=self.port, user=self.user, dbname=self.maintenance_db, connect_timeout=5
        )
        connection.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
        return connection

    def create_database(self) -> str:
        """Create an empty database ``gvr_test_<random hex>`` and return its name."""
        name = f"gvr_test_{secrets.token_hex(6)}"
        connection = self._connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return name

    def drop_database(self, name: str) -> None:
        """Terminate the connections left on ``name``, then drop it."""
        if not name.startswith("gvr_test_"):
            raise ValueError(f"refusing to drop {name!r}: only gvr_test_* databases are ours")
        connection = self._connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND pid <> pg_backend_pid()", (name,),
                )  # fmt: skip
                force = " WITH (FORCE)" if connection.server_version >= 130000 else ""
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}"{force}')
        finally:
            connection.close()

    def databases(self, prefix: str = "gvr_test_") -> list[str]:
        """Names of the databases starting with ``prefix`` (to check nothing is left behind)."""
        connection = self._connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (prefix + "%",))
                return sorted(row[0] for row in cursor.fetchall())
        finally:
            connection.close()


def find_postgres(host: str = LOOPBACK, port: int = 5432) -> PostgresServer | None:
    """The server at host:port if it answers, as the OS user (db ``test``) or ``postgres``."""
    import psycopg2

    if not port_answers(host, port):
        return None
    for user, database in (
        (getpass.getuser(), "test"),
        ("postgres", "postgres"),
        (getpass.getuser(), "postgres"),
    ):
        server = PostgresServer(host, port, user, database)
        try:
            server._connect().close()
        except psycopg2.OperationalError:
            continue
        return server
    return None


class PrivatePostgres:
    """A throw-away PostgreSQL cluster from Debian's binaries, on a free port, removed on stop.

    As root it runs as the ``postgres`` user (``runuser``): the server refuses root.
    Skips the test when the binaries are missing.
    """

    def __init__(self) -> None:
        self.bindir = _postgres_bindir()
        self.port = free_port()
        self.datadir = Path(tempfile.mkdtemp(prefix="gvr-pg-"))  # /tmp: the postgres user can reach it
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.datadir)
                pytest.skip("no postgres user to run a private server: apt-get install postgresql")
            os.chown(self.datadir, account.pw_uid, account.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def _run(self, tool: str, *args: str) -> None:
        command = [*self._as_user, str(self.bindir / tool), *args]
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise PeerStartError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")

    def start(self) -> PostgresServer:
        self._run(
            "initdb", "-D", str(self.datadir), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"
        )
        self.resume()
        return PostgresServer(LOOPBACK, self.port, "postgres", "postgres")

    def halt(self) -> None:
        """Stop the server, keeping its data (``resume`` starts it again): the audit DB going away for real."""
        self._run("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        """Start the server on its port with the data it has (after ``start`` made the cluster)."""
        options = f"-p {self.port} -k {self.datadir} -c listen_addresses={LOOPBACK} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.datadir / "server.log"), "-o", options,
                  "-w", "-t", "60", "start")  # fmt: skip
        wait_for_port(LOOPBACK, self.port, timeout=30)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.datadir, ignore_errors=True)


def _postgres_bindir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    on_path = shutil.which("initdb")
    if candidates:
        return Path(candidates[-1]).parent
    if on_path:
        return Path(on_path).parent
    pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")


# -- Redis ----------------------------------------------------------------------------------------

REDIS_CLAIM_KEY = "gvr-test:claimed-by"


def redis_answers(host: str = LOOPBACK, port: int = 6379) -> bool:
    """Whether a Redis server at host:port answers PING."""
    import redis

    try:
        return bool(redis.Redis(host=host, port=port, socket_timeout=1, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def claim_redis_db(host: str, port: int) -> tuple[int, str]:
    """Claim an empty DB index (1..15) for this test: returns (index, token).

    The claim is a marker key set with NX (one winner when parallel runs race)
    and a one-hour expiry (a crashed run does not hold the index forever).
    """
    import redis

    token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    for index in range(1, 16):
        client = redis.Redis(host=host, port=port, db=index)
        if client.dbsize() == 0 and client.set(REDIS_CLAIM_KEY, token, nx=True, ex=3600):
            return index, token
    raise PeerStartError(f"no empty Redis DB among 1..15 on {host}:{port}; other test runs hold them all")


def release_redis_db(host: str, port: int, index: int, token: str) -> None:
    """Delete the keys the test left in its claimed DB (it was empty when claimed), then the marker.

    Never FLUSHDB: if the marker shows another owner, nothing is touched.
    """
    import redis

    client = redis.Redis(host=host, port=port, db=index)
    owner = client.get(REDIS_CLAIM_KEY)
    if owner is not None and owner not in (token, token.encode()):
        return
    keys = [key for key in client.scan_iter(count=500) if key != REDIS_CLAIM_KEY.encode()]
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])
    client.delete(REDIS_CLAIM_KEY)


def start_private_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A ``redis-server`` on a free loopback port with no persistence; skips when missing."""
    binary = require_tool("redis-server", "redis-server")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "redis.log"
    command = [binary, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
               "--dir", str(workdir)]  # fmt: skip
    process = start_process(command, log)
    wait_for_port(LOOPBACK, port, timeout=20, process=process, log=log)
    return process, port
