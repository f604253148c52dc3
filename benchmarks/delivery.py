"""Delivery CPU per study (``make bench-delivery``): build the result objects and C-STORE them.

One phantom study (one positive image: overlay SC, side-by-side SC, cine SC and SR)
at each source size, delivered to dcmtk ``storescp`` by the code the delivery
worker runs (``prepare_outbox`` + ``send_files``), in a warm process as the
worker is. CPU seconds of this process (all threads) per study, split into
building and sending; beside it, the peer: dcmtk ``storescu`` sending the very
same files (its CPU from the child's rusage), measured in the same run.
Target (issue 12): <= 0.3 s of CPU per study in the delivery worker.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from node.config import Peer
from node.results.build import outbox_path, prepare_outbox
from node.scu import FileToSend, send_files
from tests.node.test_results import make_fake_job
from tests.peers import LOOPBACK, free_port, wait_for_port
from tests.peers_dcmtk import dcmtk_tool


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(size: int, rounds: int, folder: Path) -> dict[str, float]:
    fake = make_fake_job(folder / f"job-{size}", size=size)
    port = free_port()
    received = folder / f"scp-{size}"
    received.mkdir()
    scp = subprocess.Popen([dcmtk_tool("storescp"), "-od", str(received), str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for_port(LOOPBACK, port, 10.0)
        peer = Peer(ae_title="STORESCP", host=LOOPBACK, port=port)
        builds, sends, peers = [], [], []
        for round_ in range(rounds + 1):  # the first round warms the process (imports, fonts): not counted
            shutil.rmtree(fake.spool.outbox / fake.job_id, ignore_errors=True)
            started = time.process_time()
            entries = prepare_outbox(fake.spool, fake.job_id)
            built = time.process_time()
            files = [FileToSend(outbox_path(fake.spool, fake.job_id, e), e.sop_class_uid, e.sop_instance_uid,
                                e.transfer_syntax) for e in entries]  # fmt: skip
            send_files(files, peer, "GVRNODE")
            sent = time.process_time()
            before = _children_cpu()
            subprocess.run([dcmtk_tool("storescu"), "-R", "-aec", "STORESCP", LOOPBACK, str(port),
                            *[str(f.path) for f in files]], check=True, capture_output=True)  # fmt: skip
            if round_:
                builds.append(built - started)
                sends.append(sent - built)
                peers.append(_children_cpu() - before)
        megabytes = sum(f.path.stat().st_size for f in files) / 1e6
    finally:
        scp.terminate()
        scp.wait(10)
    return {"size": size, "objects": len(files), "megabytes": megabytes, "build": statistics.median(builds),
            "send": statistics.median(sends), "storescu": statistics.median(peers)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024,2048,3000", help="source image sizes (pixels a side)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    print("| source | objects | MB | build CPU s | send CPU s | delivery CPU s | dcmtk storescu send CPU s | "
          "send / storescu |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="gvr-bench-delivery-") as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            row = measure(size, args.rounds, Path(tmp))
            total = row["build"] + row["send"]
            print(f"| {size} px | {row['objects']:.0f} | {row['megabytes']:.1f} | {row['build']:.3f} | "
                  f"{row['send']:.3f} | {total:.3f} | {row['storescu']:.3f} | "
                  f"{row['send'] / max(row['storescu'], 1e-3):.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
