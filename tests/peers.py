"""Helpers for starting and reaching real peers in tests: ports, processes, tools, test files.

The fixtures in ``tests/conftest.py`` are thin wrappers around these and their
siblings (``peers_servers``: PostgreSQL and Redis; ``peers_orthanc``: Orthanc).
Everything waits by readiness (a port that accepts, an HTTP answer), never by
a fixed sleep, and every server started binds 127.0.0.1 on a free port, so
parallel runs on one machine do not collide.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from tests.peers_dcmtk import DcmtkNotFound, dcmtk_tool

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
        raise PeerStartError(
            f"{what} exited with status {process.returncode} before it was ready{_tail(log)}"
        )


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


def direct_opener() -> urllib.request.OpenerDirector:
    """A urllib opener that ignores ``http_proxy``: test servers are on loopback, never behind a proxy."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def wait_for_http(
    url: str, timeout: float = 30.0, process: subprocess.Popen[Any] | None = None, log: Path | None = None
) -> bytes:
    """Poll ``GET url`` until it answers 2xx; returns the body. Raises like ``wait_for_port``."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    opener = direct_opener()
    while time.monotonic() <= deadline:
        try:
            with opener.open(url, timeout=2) as response:
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
    """The tool's path, or skip the test naming the Debian package to install.

    dcmtk's tools resolve through ``tests.peers_dcmtk`` (outside the venv, and
    checked to be dcmtk): pynetdicom puts same-named apps in ``.venv/bin``.
    """
    if package == "dcmtk":
        try:
            return dcmtk_tool(name)
        except DcmtkNotFound as error:
            pytest.skip(str(error))
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
    storescu = require_tool("storescu", "dcmtk")
    command = [storescu, "-aet", calling_aet, "-aec", called_aet, *options, host, str(port)]
    command += [str(path) for path in files]
    return subprocess.run(
        command, check=False, env=nodelay_env(), capture_output=True, text=True, timeout=timeout
    )


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
