"""Ingest benchmark: the node's storage SCP beside Orthanc and dcmtk ``storescp``, in one run.

Why: a PACS administrator compares receivers; the node acknowledges an instance only
after it is durable (written, linked, file and folder fsynced) and audited (a committed
row), Orthanc stores and indexes, ``storescp`` only writes files. All get the same
instances from dcmtk ``storescu``, over one association and over 8 concurrent ones,
timed from the first storescu's start to the last one's exit, with ``TCP_NODELAY=1``
(Nagle costs ~40 ms per instance on loopback otherwise). The node runs twice: with
its embedded SQLite audit DB and with PostgreSQL (a database of its own, dropped after).

Run: ``make bench-ingest`` or ``python -m benchmarks.ingest [--quick] [--markdown docs/bench-ingest.md]``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

from benchmarks.ingest_flushes import Flushes, count_flushes, strace_installed
from benchmarks.ingest_receivers import (
    NodeReceiver,
    OrthancReceiver,
    Receiver,
    StorescpReceiver,
    nodelay_env,
    orthanc_installed,
    tree_cpu_seconds,
)
from tests.peers_dcmtk import DcmtkNotFound, dcmtk_tool

CR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
SCU_AET = "BENCHSCU"
SEND_TIMEOUT_S = 600.0
CONCURRENT = 8
SERIAL_FLUSHES = 2  # the file and its folder entry (fsynced together), then the audit commit
FLUSH_SAMPLE = 50  # instances sent once more under strace to count each receiver's flush calls
NODE_SQLITE, NODE_POSTGRES = "node (SQLite)", "node (PostgreSQL)"
NODE_TWO_PROCESSES = "node (SQLite, 2 SCP processes)"  # GVR_SCP_PROCESSES=2, opt-in
DOC_BEGIN, DOC_END = "<!-- bench-ingest results: begin -->", "<!-- bench-ingest results: end -->"


@dataclass(frozen=True)
class Run:
    """One timed send of every instance to one receiver."""

    receiver: str
    associations: int
    instances: int
    seconds: float
    receiver_cpu_seconds: float

    def __post_init__(self) -> None:
        if self.instances <= 0 or self.seconds <= 0 or self.associations <= 0:
            raise ValueError(f"a run needs instances, associations and time, got {self}")

    @property
    def per_second(self) -> float:
        return self.instances / self.seconds

    @property
    def cpu_ms_per_instance(self) -> float:
        return 1000 * self.receiver_cpu_seconds / self.instances


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


# -- sending ----------------------------------------------------------------------------


def send_all(files: list[Path], receiver: Receiver, work: Path, associations: int) -> Run:
    """``associations`` storescu processes at once, one association each, the files dealt round-robin."""
    storescu = dcmtk_tool("storescu")
    with receiver.serve(work) as listening:
        commands = [
            [storescu, "-aet", SCU_AET, "-aec", listening.aet, "127.0.0.1", str(listening.port),
             *map(str, files[index::associations])]
            for index in range(associations)
        ]  # fmt: skip
        cpu_before = tree_cpu_seconds(listening.pid)
        started = time.perf_counter()
        senders = [
            subprocess.Popen(command, env=nodelay_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for command in commands
        ]
        failures = [_failure(sender) for sender in senders]
        seconds = time.perf_counter() - started
        cpu = tree_cpu_seconds(listening.pid) - cpu_before
    errors = [failure for failure in failures if failure]
    if errors:
        raise RuntimeError(f"storescu failed sending to {receiver.name}: {errors[0]}")
    receiver.check(work, len(files))
    return Run(receiver.name, associations, len(files), seconds, cpu)


def _failure(sender: subprocess.Popen[bytes]) -> str | None:
    try:
        _, stderr = sender.communicate(timeout=SEND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        sender.kill()
        sender.communicate()
        return f"no exit within {SEND_TIMEOUT_S} s"
    return (
        None
        if sender.returncode == 0
        else f"exit {sender.returncode}: {stderr.decode(errors='replace')[-2000:]}"
    )


def postgres_receiver() -> NodeReceiver | None:
    """The node with a PostgreSQL audit DB (a fresh database per run); None without a server."""
    from tests.peers_servers import find_postgres

    server = find_postgres()
    return None if server is None else NodeReceiver(NODE_POSTGRES, server)


def run_all(
    files: list[Path], receivers: list[Receiver], modes: list[int], repeats: int, root: Path
) -> list[Run]:
    """Interleave receivers and modes so a load change on the machine hits all alike."""
    runs: list[Run] = []
    for repeat in range(repeats):
        for associations in modes:
            for receiver in receivers:
                work = root / f"{_slug(receiver.name)}-{associations}-{repeat}"
                work.mkdir()
                runs.append(send_all(files, receiver, work, associations))
                print(f"  {receiver.name:<18} x{associations} run {repeat + 1}: "
                      f"{runs[-1].per_second:6.1f} instances/s, {runs[-1].cpu_ms_per_instance:5.2f} ms CPU each",
                      flush=True)  # fmt: skip
                shutil.rmtree(work, ignore_errors=True)
    return runs


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# -- the report -------------------------------------------------------------------------


def median_rate(runs: list[Run]) -> float:
    return statistics.median(run.per_second for run in runs)


def _select(runs: list[Run], receiver: str, associations: int) -> list[Run]:
    return [run for run in runs if run.receiver == receiver and run.associations == associations]


def report(runs: list[Run], count: int, conditions: list[str], flushes: Sequence[Flushes] = ()) -> str:
    """Markdown: one row per receiver and mode, the node's ratios to each peer, then what each flushed."""
    receivers = list(dict.fromkeys(run.receiver for run in runs))
    modes = sorted({run.associations for run in runs})
    repeats = max(len(_select(runs, receivers[0], mode)) for mode in modes)
    lines = [
        (
            f"{count} instances of ~525 KB (512x512 16-bit CR), {repeats} run(s) per receiver and mode, medians; "
            f"storescu with TCP_NODELAY=1; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC."
        ),
        "",
        *(f"- {line}" for line in conditions),
        "",
        "| receiver | associations | instances/s | each run | CPU ms per instance |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    for mode in modes:
        for receiver in receivers:
            chosen = _select(runs, receiver, mode)
            if chosen:
                cpu = statistics.median(run.cpu_ms_per_instance for run in chosen)
                each = ", ".join(f"{run.per_second:.0f}" for run in chosen)
                lines.append(f"| {receiver} | {mode} | {median_rate(chosen):.1f} | {each} | {cpu:.2f} |")
    lines += ["", "| ratio (instances/s) | " + " | ".join(f"{mode} assoc." for mode in modes) + " |",
              "| --- |" + " ---: |" * len(modes)]  # fmt: skip
    for node in (NODE_SQLITE, NODE_POSTGRES, NODE_TWO_PROCESSES):
        for peer in ("Orthanc", "storescp"):
            cells = [_ratio(runs, node, peer, mode) for mode in modes]
            if any(cells):
                lines.append(f"| {node} / {peer} | " + " | ".join(cell or "-" for cell in cells) + " |")
    if flushes:
        heading = f"Flush calls per instance, counted by strace over {flushes[0].instances} instances on one association"
        lines += ["", f"{heading} (not timed):", "", *(f"- {flush.describe()}" for flush in flushes)]
    return "\n".join(lines)


def _ratio(runs: list[Run], node: str, peer: str, associations: int) -> str | None:
    mine, theirs = _select(runs, node, associations), _select(runs, peer, associations)
    return f"{median_rate(mine) / median_rate(theirs):.2f}" if mine and theirs else None


def write_markdown(path: Path, table: str) -> None:
    """Replace the results block of ``path`` (between the begin/end markers) with ``table``."""
    text = path.read_text()
    if DOC_BEGIN not in text or DOC_END not in text:
        raise ValueError(f"{path} has no {DOC_BEGIN} ... {DOC_END} block to replace")
    head, rest = text.split(DOC_BEGIN, 1)
    _, tail = rest.split(DOC_END, 1)
    path.write_text(f"{head}{DOC_BEGIN}\n{table}\n{DOC_END}{tail}")


def flush_ms(folder: Path, samples: int = 40) -> float:
    """Median cost of one 4 KB write + ``fdatasync`` in ``folder``: the disk's flush latency.

    The node waits for two flushes per instance, one after the other (the file and its
    folder entry, fsynced together; then the audit commit), so about
    ``1000 / (2 * flush_ms)`` instances/s is its ceiling on this disk, however fast the rest is.
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
        description="Time C-STORE ingest into the node (SQLite and PostgreSQL audit DB), Orthanc and dcmtk "
        "storescp from dcmtk storescu, over 1 and 8 concurrent associations.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="100 instances, 1 repeat")
    parser.add_argument("--count", type=int, default=500, help="instances per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per receiver and mode (median reported)")
    parser.add_argument("--associations", type=int, nargs="+", default=[1, CONCURRENT],
                        help="modes: concurrent associations per run")  # fmt: skip
    parser.add_argument("--only", nargs="+", choices=("node", "postgres", "node2", "orthanc", "storescp"),
                        default=None,
                        help="benchmark these receivers only (node2: the node with GVR_SCP_PROCESSES=2)")  # fmt: skip
    parser.add_argument("--no-count-flushes", dest="count_flushes", action="store_false",
                        help="skip the strace run that counts each receiver's flush calls per instance")  # fmt: skip
    parser.add_argument("--markdown", type=Path, default=None,
                        help="write the results table into this file's bench-ingest results block")  # fmt: skip
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
    if count < 1 or repeats < 1 or min(args.associations) < 1 or count < max(args.associations):
        print(
            "--count, --repeats and --associations must be at least 1 (and count >= associations)",
            file=sys.stderr,
        )
        return 2
    try:  # dcmtk's, not pynetdicom's same-named apps in the venv
        tools = [dcmtk_tool(tool) for tool in ("storescu", "storescp")]
    except DcmtkNotFound as error:
        print(error, file=sys.stderr)
        return 2
    wanted = set(args.only or ("node", "postgres", "node2", "orthanc", "storescp"))
    if "orthanc" in wanted and not orthanc_installed():
        print("Orthanc not found: apt-get install orthanc (or leave it out with --only)", file=sys.stderr)
        return 2
    print("dcmtk: " + ", ".join(tools), file=sys.stderr)
    with (
        tempfile.TemporaryDirectory(prefix="gvr-bench-src-") as source_dir,
        tempfile.TemporaryDirectory(prefix="gvr-bench-", dir=args.data_root) as work_dir,
    ):
        postgres = postgres_receiver() if "postgres" in wanted else None
        if "postgres" in wanted and postgres is None:
            print("PostgreSQL not found on 127.0.0.1:5432: the node runs with SQLite only", file=sys.stderr)
        receivers: list[Receiver] = [
            receiver
            for key, receiver in (("node", NodeReceiver(NODE_SQLITE)), ("postgres", postgres),
                                  ("node2", NodeReceiver(NODE_TWO_PROCESSES, scp_processes=2)),
                                  ("orthanc", OrthancReceiver()), ("storescp", StorescpReceiver()))
            if key in wanted and receiver is not None
        ]  # fmt: skip
        source, root = Path(source_dir), Path(work_dir)
        started = time.perf_counter()
        files = write_instances(source, count)
        print(f"wrote {count} instances in {time.perf_counter() - started:.1f} s")
        conditions = [f"before: {_conditions(root)}"]
        print(conditions[0])
        runs = run_all(files, receivers, sorted(set(args.associations)), repeats, root)
        conditions.append(f"after: {_conditions(root)}")
        print(conditions[1])
        flushes = flush_counts(files[:FLUSH_SAMPLE], receivers, root) if args.count_flushes else []
    table = report(runs, count, conditions, flushes)
    print(table)
    if args.markdown is not None:
        write_markdown(args.markdown, table)
        print(f"results written into {args.markdown}")
    return 0


def flush_counts(files: list[Path], receivers: list[Receiver], root: Path) -> list[Flushes]:
    """Each receiver's flush calls per instance (strace); PostgreSQL's flushes are in its server, not counted."""
    if not strace_installed():
        print("strace not found (apt-get install strace): flush calls not counted", file=sys.stderr)
        return []
    counted = []
    for receiver in receivers:
        if receiver.name == NODE_POSTGRES:
            continue
        work = root / f"flushes-{_slug(receiver.name)}"
        work.mkdir()
        counted.append(count_flushes(files, receiver, work))
        print(counted[-1].describe(), flush=True)
        shutil.rmtree(work, ignore_errors=True)
    return counted


def _conditions(root: Path) -> str:
    """Load and disk flush latency now: both move these numbers more than any code change."""
    flush = flush_ms(root)
    ceiling = 1000 / (SERIAL_FLUSHES * flush) if flush > 0 else float("inf")
    return (
        f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs; disk flush {flush:.2f} ms "
        f"({SERIAL_FLUSHES} in series per node instance on one association: ceiling ~{ceiling:.0f} instances/s)"
    )


if __name__ == "__main__":
    sys.exit(main())
