"""Turnaround benchmark (``make bench-e2e``): last C-STORE response -> SR stored in Orthanc.

20 phantom studies sent back to back to a node with one CPU inference worker and
one delivery worker; prints p50/p95 turnaround and throughput. Target p50 <= 10 s
on a 2-core machine.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from node.demo.run import demo_environment, make_studies, send_study, wait_for_reports


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--warmup", type=int, default=1,
                        help="studies sent and awaited first, not counted: the workers' first job loads the "
                        "bundle and imports (a cold start is not a study's turnaround)")
    parser.add_argument(
        "--dicom-threads", type=int, default=1, help="delivery worker threads (the inference worker stays one)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="gvr-bench-e2e-") as tmp:
        folder = Path(tmp)
        studies = make_studies(folder / "studies", args.studies, first_seed=9_500_000)
        warmup = make_studies(folder / "warmup", args.warmup, first_seed=9_400_000) if args.warmup else []
        dicom = "dicom" if args.dicom_threads == 1 else f"dicom --pool threads --concurrency {args.dicom_threads}"
        with demo_environment(folder, ["gpu", dicom]) as demo:
            if not demo.workers:
                print("inference is not installed: nothing to measure")
                return 1
            for study in warmup:
                send_study(study, demo.node_peer)
                wait_for_reports(demo.pacs, [study], args.timeout)
            print(f"PACS: {demo.pacs.name}; {len(warmup)} warm-up study; sending {len(studies)} studies back to back ...")
            started = time.monotonic()
            for study in studies:
                send_study(study, demo.node_peer)
            wait_for_reports(demo.pacs, studies, args.timeout)
            elapsed = time.monotonic() - started
    turnarounds = [s.turnaround for s in studies if s.turnaround is not None]
    if not turnarounds:
        print("no Structured Report arrived")
        return 1
    print("| studies | completed | p50 turnaround | p95 turnaround | mean | wall | studies/min |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {len(studies)} | {len(turnarounds)} | {percentile(turnarounds, 50):.1f} s | "
        f"{percentile(turnarounds, 95):.1f} s | {statistics.mean(turnarounds):.1f} s | {elapsed:.0f} s | "
        f"{60 * len(turnarounds) / elapsed:.1f} |"
    )
    return 0 if len(turnarounds) == len(studies) else 1


if __name__ == "__main__":
    raise SystemExit(main())
