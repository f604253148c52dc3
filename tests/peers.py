"""Helpers for starting and reaching real peers in tests: ports, processes, tools, servers.

The fixtures in ``tests/conftest.py`` are thin wrappers around these. Everything
here waits by readiness (a port that accepts, an HTTP answer), never by a fixed
sleep, and every server it starts binds 127.0.0.1 on a free port, so parallel
runs on one machine do not collide.
"""

from __future__ import annotations

import getpass
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest

LOOPBACK = "127.0.0.1"


class PeerStartError(RuntimeError):
    """A peer process exited or never became ready; the message carries its log tail."""


# -- ports and readiness -------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it: bind to port 0)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def port_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts a TCP connection on host:port now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _check_alive(process: subprocess.Popen[Any] | None, what: str, log: Path | None) -> None:
    if process is not None and process.poll() is not None:
        raise PeerStartError(f"{what} exited with status {process.returncode} before it was ready{_tail(log)}")


def wait_for_port(
    host: str, port: int, timeout: float = 30.0, process: subprocess.Popen[Any] | None = None,
    log: Path | None = None,
) -> None:  # fmt: skip
    """Poll until something accepts connections on host:port (never a fixed sleep).

    Raises ``PeerStartError`` at once when ``process`` exits first (with the tail
    of ``log``), ``TimeoutError`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not port_answers(host, port):
        _check_alive(process, f"process for {host}:{port}", log)
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s{_tail(log)}")
        time.sleep(0.05)


def wait_for_http(
    url: str, timeout: float = 30.0, process: subprocess.Popen[Any] | None = None, log: Path | None = None
) -> bytes:
    """Poll ``GET url`` until it answers 2xx; returns the body. Raises like ``wait_for_port``."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() <= deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bytes(response.read())
        except (urllib.error.URLError, OSError) as exc:  # refused, reset, 5xx while starting
            last = exc
        _check_alive(process, f"server for {url}", log)
        time.sleep(0.05)
    raise TimeoutError(f"GET {url} did not answer within {timeout} s (last error: {last}){_tail(log)}")


# -- processes ---------------------------------------------------------------------------------


def start_process(
    command: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``command`` with stdout and stderr appended to ``log_path`` (a test can read it)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None, cwd=cwd,
        )  # fmt: skip


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0, sig: int = signal.SIGTERM) -> int:
    """Send ``sig``, wait ``timeout`` seconds for the exit, then SIGKILL. Returns the exit status."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
    return int(process.returncode)


def log_tail(path: Path | None, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file ('' when there is none)."""
    if path is None or not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _tail(log: Path | None) -> str:
    text = log_tail(log)
    return f"\n--- last lines of {log} ---\n{text}" if text else ""


# -- command-line tools (dcmtk, dicom3tools, ...) ------------------------------------------------


def require_tool(name: str, package: str) -> str:
    """The tool's path, or skip the test naming the Debian package to install."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found: apt-get install {package}")
    return path


def nodelay_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment with ``TCP_NODELAY=1``: dcmtk and Orthanc lose ~40 ms per instance without it."""
    env = dict(os.environ if base is None else base)
    env["TCP_NODELAY"] = "1"
    return env


# transfer syntax -> the storescu option that proposes it (plus uncompressed); one per association
STORESCU_PROPOSE: dict[str, str] = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def storescu_option(transfer_syntax: str) -> str:
    """The ``storescu`` option proposing ``transfer_syntax``: by default it offers uncompressed only."""
    try:
        return STORESCU_PROPOSE[transfer_syntax]
    except KeyError:
        raise ValueError(f"no storescu option proposes transfer syntax {transfer_syntax!r}") from None


def run_storescu(
    port: int, files: Iterable[Path], *options: str, host: str = LOOPBACK, calling_aet: str = "STORESCU",
    called_aet: str = "GVRNODE", timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Send ``files`` with dcmtk's ``storescu`` in one association; skips when dcmtk is missing.

    ``options`` go before host and port, e.g. ``storescu_option(syntax), "-R"``
    for a compressed file (storescu offers only uncompressed syntaxes unless
    told, and converts nothing compressed). The result is not checked: a test
    asserts on ``returncode`` and the output it expects.
    """
    require_tool("storescu", "dcmtk")
    command = ["storescu", "-aet", calling_aet, "-aec", called_aet, *options, host, str(port)]
    command += [str(path) for path in files]
    return subprocess.run(command, env=nodelay_env(), capture_output=True, text=True, timeout=timeout)


# -- pydicom's bundled test files ----------------------------------------------------------------


class DicomTestFile(NamedTuple):
    """A bundled single-frame image file and what it is (unpacks as a 3-tuple)."""

    path: Path
    transfer_syntax: str
    sop_class: str

    def sop_instance_uid(self) -> str:
        """Read from the file: several MR_small variants share one SOP Instance UID."""
        import pydicom

        return str(pydicom.dcmread(self.path, stop_before_pixels=True).SOPInstanceUID)


# name -> transfer syntax it must have; one or two per family
_TEST_FILES: dict[str, str] = {
    "MR_small_implicit.dcm": "1.2.840.10008.1.2",  # implicit VR little endian
    "CT_small.dcm": "1.2.840.10008.1.2.1",  # explicit VR little endian
    "MR_small.dcm": "1.2.840.10008.1.2.1",
    "image_dfl.dcm": "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
    "SC_rgb_jpeg_dcmtk.dcm": "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "JPEG-lossy.dcm": "1.2.840.10008.1.2.4.51",  # JPEG extended
    "SC_rgb_jpeg_gdcm.dcm": "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",  # RLE lossless
}


def pydicom_test_files() -> list[DicomTestFile]:
    """pydicom's bundled single-frame images, one or two per transfer syntax family.

    Found with ``get_testdata_file(name, download=False)``: a file that is not
    bundled would otherwise be downloaded, which offline costs ~21 s of retries
    per file. A file is listed only when it has the expected transfer syntax, a
    file meta that matches its data set (SOP class and instance) and pixel
    data. Big endian is left out (retired; peers may refuse it).
    """
    from pydicom.data import get_testdata_file

    found = []
    for name, syntax in _TEST_FILES.items():
        path = get_testdata_file(name, download=False)
        if path is not None and (entry := _describe(Path(str(path)), syntax)) is not None:
            found.append(entry)
    return found


def _describe(path: Path, syntax: str) -> DicomTestFile | None:
    import pydicom

    ds = pydicom.dcmread(path)
    meta = ds.file_meta
    valid = (
        ds.preamble is not None
        and meta.get("TransferSyntaxUID") == syntax
        and meta.get("MediaStorageSOPClassUID") == ds.get("SOPClassUID")
        and meta.get("MediaStorageSOPInstanceUID") == ds.get("SOPInstanceUID")
        and "PixelData" in ds
        and int(ds.get("NumberOfFrames", 1) or 1) == 1
    )
    return DicomTestFile(path, syntax, str(ds.SOPClassUID)) if valid else None


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
    for user, database in ((getpass.getuser(), "test"), ("postgres", "postgres"), (getpass.getuser(), "postgres")):
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
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise PeerStartError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")

    def start(self) -> PostgresServer:
        self._run("initdb", "-D", str(self.datadir), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        options = f"-p {self.port} -k {self.datadir} -c listen_addresses={LOOPBACK} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.datadir), "-l", str(self.datadir / "server.log"), "-o", options,
                  "-w", "-t", "60", "start")  # fmt: skip
        wait_for_port(LOOPBACK, self.port, timeout=30)
        return PostgresServer(LOOPBACK, self.port, "postgres", "postgres")

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
    if owner is not None and owner.decode() != token:
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


# -- Orthanc (the PACS in tests) -----------------------------------------------------------------


class Orthanc:
    """A private Orthanc: own config and storage under ``root``, free DICOM and HTTP ports.

    Never ``/etc/orthanc`` (Debian merges every JSON there). Talks REST with
    urllib. ``start()`` skips when Orthanc is not installed.
    """

    def __init__(self, root: Path, aet: str = "ORTHANC") -> None:
        self.root = root
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.url = f"http://{LOOPBACK}:{self.http_port}"
        self.log = root / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None

    def config(self) -> dict[str, Any]:
        return {
            "Name": f"gvr-test-{self.aet}",
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "storage"),
            "DicomAlwaysAllowStore": True,
            "StableAge": 5,
            "DicomModalities": {},
            "SaveJobs": False,
        }

    def start(self, timeout: float = 30.0) -> Orthanc:
        binary = require_tool("Orthanc", "orthanc")
        self.root.mkdir(parents=True, exist_ok=True)
        config_path = self.root / "config.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        self.process = start_process([binary, str(config_path)], self.log, env=nodelay_env())
        wait_for_http(f"{self.url}/system", timeout, process=self.process, log=self.log)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ask Orthanc to shut down, wait for the PID (its index stays locked until then), kill after."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.request("POST", "/tools/shutdown", b"")
        except (urllib.error.URLError, OSError):
            self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)

    def request(self, method: str, path: str, body: bytes | dict[str, Any] | None = None) -> Any:
        """One REST call; JSON bodies are encoded, JSON answers decoded (else the raw bytes)."""
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = response.read()
            if "json" in response.headers.get("Content-Type", ""):
                return json.loads(payload) if payload else None
            return payload

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare a DICOM peer at run time (``PUT /modalities/<name>``)."""
        self.request("PUT", f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def upload(self, path: Path) -> dict[str, Any]:
        """Store a DICOM file through REST; Orthanc's answer holds ``ID`` and ``ParentStudy``."""
        answer: dict[str, Any] = self.request("POST", "/instances", path.read_bytes())
        return answer

    def store_to(self, modality: str, resource_ids: Sequence[str]) -> dict[str, Any]:
        """C-STORE resources to a declared modality, waiting for the transfer to finish."""
        body = {"Resources": list(resource_ids), "Synchronous": True}
        answer: dict[str, Any] = self.request("POST", f"/modalities/{modality}/store", body)
        return answer

    def find_instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        return list(self.request("GET", "/instances"))

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """An instance's tags by keyword (``simplified-tags``)."""
        return dict(self.request("GET", f"/instances/{instance_id}/simplified-tags"))

    def studies(self) -> list[str]:
        """Orthanc ids of every study."""
        return list(self.request("GET", "/studies"))
