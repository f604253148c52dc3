"""Ingest benchmark: the node's storage SCP against dcmtk ``storescp`` on loopback.

Why: the node acknowledges an instance only after it is durable (write, fsync,
rename, directory fsync) and audited (a committed SQLite row), so it can never
match a receiver that only writes files; this measures how close it gets. Both
receivers get the same instances from the same ``storescu`` in one association,
timed from storescu's start to its exit, with ``TCP_NODELAY=1`` (Nagle costs
~40 ms per instance on loopback otherwise).

Run: ``make bench-ingest`` or ``python -m benchmarks.ingest [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from tests.peers_dcmtk import DcmtkNotFound, dcmtk_tool

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
NODE_AET = "GVRNODE"
STORESCP_AET = "STORESCP"
SCU_AET = "BENCHSCU"
READY_TIMEOUT_S = 60.0
SEND_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Run:
    """One timed send of every instance to one receiver."""

    receiver: str
    instances: int
    seconds: float
    receiver_cpu_seconds: float

    def __post_init__(self) -> None:
        if self.instances <= 0 or self.seconds <= 0:
            raise ValueError(f"a run needs instances and time, got {self.instances} in {self.seconds} s")

    @property
    def per_second(self) -> float:
        return self.instances / self.seconds


# -- the instances ---------------------------------------------------------------------


def write_instances(folder: Path, count: int, studies: int = 5, seed: int = 7) -> list[Path]:
    """``count`` distinct 512x512 16-bit CR images (~0.5 MB each) over a few studies."""
    rng = np.random.default_rng(seed)
    study_uids = [generate_uid() for _ in range(studies)]
    series_uids = [generate_uid() for _ in range(studies)]
    paths = []
    for index in range(count):
        pixels = rng.integers(0, 4096, size=(512, 512), dtype=np.uint16)
        ds = _cr_dataset(study_uids[index % studies], series_uids[index % studies], index, pixels)
        path = folder / f"cr{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _cr_dataset(study_uid: str, series_uid: str, index: int, pixels: np.ndarray) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientID, ds.PatientName = f"BENCH{index % 5}", "Bench^Ingest"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20260101", "120000", f"A{index % 5}"
    ds.SeriesNumber, ds.InstanceNumber = 1, index + 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    return ds


# -- processes and ports ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll connect until the receiver listens; fail early if it died."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"receiver exited with {process.returncode} before listening:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)  # a poll interval, not a guess at readiness
    raise RuntimeError(f"nothing listened on port {port} within {READY_TIMEOUT_S} s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (Linux /proc), 0.0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def running(
    command: list[str], env: dict[str, str], port: int, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a receiver, wait until it listens, and stop it (SIGTERM, then SIGKILL) after."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, process, log)
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def send_all(source: Path, called_aet: str, port: int, receiver: subprocess.Popen[bytes], count: int) -> Run:
    """One ``storescu`` association with every file in ``source``; timed start to exit."""
    storescu = dcmtk_tool("storescu")
    command = [storescu, "-aet", SCU_AET, "-aec", called_aet, "127.0.0.1", str(port), "+sd", str(source)]
    cpu_before = cpu_seconds(receiver.pid)
    started = time.perf_counter()
    done = subprocess.run(command, env=dcmtk_env(), capture_output=True, timeout=SEND_TIMEOUT_S, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"storescu exited {done.returncode}: {done.stderr.decode(errors='replace')[-2000:]}"
        )
    return Run(called_aet, count, seconds, cpu_seconds(receiver.pid) - cpu_before)


# -- the two receivers -----------------------------------------------------------------


def node_command() -> list[str]:
    gvr = Path(sys.executable).with_name("gvr")
    return [str(gvr), "node"] if gvr.exists() else [sys.executable, "-m", "node.cli.main", "node"]


def bench_node(source: Path, count: int, work: Path) -> Run:
    """The node with its defaults (SQLite audit, durable spool); checks all were kept."""
    data_dir, port = work / "node-data", free_port()
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("GVR_")}
    env = {  # the defaults (SQLite audit DB, server-less broker), whatever the caller's shell sets
        **inherited,
        "GVR_DATA_DIR": str(data_dir),
        "GVR_PORT": str(port),
        "GVR_BIND_ADDRESS": "127.0.0.1",
        "GVR_AE_TITLE": NODE_AET,
        "GVR_STUDY_STABLE_SECONDS": "3600",  # ingest only: no jobs queued while we measure
    }
    with running(node_command(), env, port, work / "node.log") as node:
        run = send_all(source, NODE_AET, port, node, count)
    check_node_kept(data_dir, count)
    return run


def check_node_kept(data_dir: Path, count: int) -> None:
    with closing(sqlite3.connect(data_dir / "audit.sqlite3")) as db:
        statuses = dict(db.execute("select status, count(*) from instances group by status").fetchall())
    files = sum(1 for _ in (data_dir / "spool" / "incoming").rglob("*.dcm"))
    if statuses != {"accepted": count} or files != count:
        raise RuntimeError(f"node kept {files} files, audit rows {statuses}; expected {count} accepted")


def bench_storescp(source: Path, count: int, work: Path) -> Run:
    """dcmtk ``storescp`` writing each instance to a folder (no fsync, no index)."""
    out, port = work / "storescp-data", free_port()
    out.mkdir()
    command = [dcmtk_tool("storescp"), "-od", str(out), "-aet", STORESCP_AET, str(port)]
    with running(command, dcmtk_env(), port, work / "storescp.log") as storescp:
        run = send_all(source, STORESCP_AET, port, storescp, count)
    files = sum(1 for _ in out.iterdir())
    if files != count:
        raise RuntimeError(f"storescp wrote {files} files; expected {count}")
    return run


# -- the report ------------------------------------------------------------------------


def median_rate(runs: list[Run]) -> float:
    return statistics.median(run.per_second for run in runs)


def report(node: list[Run], storescp: list[Run], count: int) -> str:
    rows = [f"{count} instances x {len(node)} repeat(s), one association each, TCP_NODELAY=1"]
    rows.append(f"{'receiver':<10} {'median/s':>9} {'runs/s':>24} {'CPU ms/inst':>12}")
    for name, runs in (("node", node), ("storescp", storescp)):
        each = " ".join(f"{run.per_second:.0f}" for run in runs)
        cpu = statistics.median(1000 * run.receiver_cpu_seconds / run.instances for run in runs)
        rows.append(f"{name:<10} {median_rate(runs):>9.1f} {each:>24} {cpu:>12.2f}")
    rows.append(f"ratio node/storescp: {median_rate(node) / median_rate(storescp):.2f}")
    return "\n".join(rows)


def flush_ms(folder: Path, samples: int = 40) -> float:
    """Median cost of one 4 KB write + ``fdatasync`` in ``folder``: the disk's flush latency.

    The node makes three flushes per instance, one after another (the file, its
    folder entry, the audit commit), so about ``1000 / (3 * flush_ms)`` instances/s
    is its ceiling on this disk, however fast the rest is.
    """
    path = folder / "flush-probe"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, bytes(4096))
        os.fsync(fd)
        times = []
        for sample in range(samples):
            os.pwrite(fd, sample.to_bytes(4, "little") * 1024, 0)
            started = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return 1000 * statistics.median(times)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ingest",
        description="Time C-STORE ingest into the node and into dcmtk storescp from one storescu association.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="100 instances, 1 repeat")
    parser.add_argument("--count", type=int, default=500, help="instances per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per receiver (median reported)")
    parser.add_argument("--only", choices=("node", "storescp"), default=None, help="benchmark one receiver")
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="where the receivers write (default: the system temp folder). A tmpfs such as /dev/shm "
        "shows the node's software ceiling only: fsync is free there and nothing is durable",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    count, repeats = (100, 1) if args.quick else (args.count, args.repeats)
    if count < 1 or repeats < 1:
        print("--count and --repeats must be at least 1", file=sys.stderr)
        return 2
    try:  # dcmtk's, not pynetdicom's same-named apps in the venv
        tools = [dcmtk_tool(tool) for tool in ("storescu", "storescp")]
    except DcmtkNotFound as error:
        print(error, file=sys.stderr)
        return 2
    print("dcmtk: " + ", ".join(tools), file=sys.stderr)
    with (
        tempfile.TemporaryDirectory(prefix="gvr-bench-src-") as source_dir,
        tempfile.TemporaryDirectory(prefix="gvr-bench-", dir=args.data_root) as work_dir,
    ):
        source, root = Path(source_dir), Path(work_dir)
        started = time.perf_counter()
        write_instances(source, count)
        print(f"wrote {count} instances in {time.perf_counter() - started:.1f} s")
        print(_conditions(root))
        node_runs, storescp_runs = _run_all(source, count, repeats, root, args.only)
        print(_conditions(root))
    if node_runs and storescp_runs:
        print(report(node_runs, storescp_runs, count))
    for name, runs in (("node", node_runs), ("storescp", storescp_runs)):
        if runs and not (node_runs and storescp_runs):
            print(f"{name}: median {median_rate(runs):.1f} instances/s over {len(runs)} run(s)")
    return 0


def _conditions(root: Path) -> str:
    """Load and disk flush latency now: both move these numbers more than any code change."""
    flush = flush_ms(root)
    ceiling = 1000 / (3 * flush) if flush > 0 else float("inf")
    return (
        f"load average {os.getloadavg()[0]:.2f}; disk flush {flush:.2f} ms "
        f"(3 per node instance: ceiling ~{ceiling:.0f} instances/s)"
    )


def _run_all(
    source: Path, count: int, repeats: int, root: Path, only: str | None
) -> tuple[list[Run], list[Run]]:
    """Interleave the receivers so a load change on the machine hits both alike."""
    node_runs: list[Run] = []
    storescp_runs: list[Run] = []
    for repeat in range(repeats):
        for name, bench, runs in (
            ("node", bench_node, node_runs),
            ("storescp", bench_storescp, storescp_runs),
        ):
            if only not in (None, name):
                continue
            work = root / f"{name}-{repeat}"
            work.mkdir()
            runs.append(bench(source, count, work))
            print(f"  {name:<9} run {repeat + 1}: {runs[-1].per_second:6.1f} instances/s", flush=True)
            shutil.rmtree(work, ignore_errors=True)
    return node_runs, storescp_runs


if __name__ == "__main__":
    sys.exit(main())
