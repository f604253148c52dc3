"""Turnaround benchmark (``make bench-e2e``): last C-STORE response -> SR stored in Orthanc.

Phantom studies sent to a node with one CPU inference worker and one delivery
worker: single studies on an idle pipeline, then 20 back to back; prints p50/p95
turnaround and throughput. Beside it, in the same run, the peer a hospital would
otherwise build (``benchmarks.e2e_peer``): an Orthanc routing node forwarding the
same studies to the same PACS, measured the same way, with no inference.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.e2e_peer import RouterOrthanc, route_batch, route_singles
from node.demo.pacs import OrthancPacs
from node.demo.run import (
    DemoEnvironment,
    DemoStudy,
    demo_environment,
    make_studies,
    send_study,
    wait_for_reports,
)

NODE = "gvr node"
ROUTER = "Orthanc router"


@dataclass(frozen=True)
class Measured:
    """One pipeline's turnarounds: single studies on an idle pipeline, then a batch sent back to back."""

    name: str
    singles: list[float]
    batch: list[float]
    batch_sent: int
    wall: float


@dataclass(frozen=True)
class Studies:
    warmup: list[DemoStudy]
    singles: list[DemoStudy]
    batch: list[DemoStudy]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def turnarounds(studies: list[DemoStudy]) -> list[float]:
    return [s.turnaround for s in studies if s.turnaround is not None]


def fresh(studies: list[DemoStudy]) -> list[DemoStudy]:
    """The same files, not yet sent: the router gets the very studies the node got."""
    return [replace(s, sent_at=0.0, reported_at=None) for s in studies]


def measure_node(demo: DemoEnvironment, studies: Studies, timeout: float) -> Measured:
    for study in studies.warmup + studies.singles:
        send_study(study, demo.node_peer)
        wait_for_reports(demo.pacs, [study], timeout)
    started = time.monotonic()
    for study in studies.batch:
        send_study(study, demo.node_peer)
    wait_for_reports(demo.pacs, studies.batch, timeout)
    wall = time.monotonic() - started
    return Measured(NODE, turnarounds(studies.singles), turnarounds(studies.batch), len(studies.batch), wall)


def measure_router(folder: Path, pacs: OrthancPacs, studies: Studies, timeout: float) -> Measured:
    singles, batch = fresh(studies.singles), fresh(studies.batch)
    router = RouterOrthanc(folder / "router", pacs.peer).start()
    try:
        route_singles(router, pacs, fresh(studies.warmup) + singles, timeout)
        wall = route_batch(router, pacs, batch, timeout)
    finally:
        router.stop(timeout=30)
    return Measured(ROUTER, turnarounds(singles), turnarounds(batch), len(batch), wall)


def print_table(runs: list[Measured], singles: int) -> None:
    print("| pipeline | run | completed | p50 | p95 | mean | wall | studies/min |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for m in runs:
        each = " / ".join(f"{t:.1f}" for t in m.singles)
        if singles:
            print(
                f"| {m.name} | single study, idle ({singles} runs) | {len(m.singles)}/{singles} | {each} s | | | | |"
            )
        if m.batch:
            print(
                f"| {m.name} | {m.batch_sent} back to back | {len(m.batch)}/{m.batch_sent} | "
                f"{percentile(m.batch, 50):.1f} s | {percentile(m.batch, 95):.1f} s | "
                f"{statistics.mean(m.batch):.1f} s | {m.wall:.0f} s | {60 * len(m.batch) / m.wall:.1f} |"
            )


def print_comparison(node: Measured, router: Measured) -> None:
    """The node's p50 beside the router's: what the pipeline adds on top of a routing node."""
    for run, ours, theirs in (
        ("single study", node.singles, router.singles),
        ("back to back", node.batch, router.batch),
    ):
        if ours and theirs:
            a, b = percentile(ours, 50), percentile(theirs, 50)
            print(f"{run}: p50 {NODE} {a:.1f} s, {ROUTER} {b:.1f} s: +{a - b:.1f} s, {a / b:.1f}x")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=20, help="studies sent back to back")
    parser.add_argument(
        "--singles", type=int, default=3, help="studies sent one at a time to an idle pipeline first"
    )
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="studies sent and awaited first, not counted: the workers' first job loads the "
        "bundle and imports (a cold start is not a study's turnaround)",
    )
    parser.add_argument(
        "--dicom-threads",
        type=int,
        default=1,
        help="delivery worker threads (the inference worker stays one)",
    )
    parser.add_argument("--no-peer", action="store_true", help="skip the Orthanc routing node")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    with tempfile.TemporaryDirectory(prefix="gvr-bench-e2e-") as tmp:
        folder = Path(tmp)
        studies = Studies(
            make_studies(folder / "warmup", args.warmup, first_seed=9_400_000) if args.warmup else [],
            make_studies(folder / "singles", args.singles, first_seed=9_450_000) if args.singles else [],
            make_studies(folder / "studies", args.studies, first_seed=9_500_000),
        )
        dicom = (
            "dicom" if args.dicom_threads == 1 else f"dicom --pool threads --concurrency {args.dicom_threads}"
        )
        with demo_environment(folder, ["gpu", dicom]) as demo:
            if not demo.workers:
                print("inference is not installed: nothing to measure")
                return 1
            print(
                f"PACS: {demo.pacs.name}; {args.warmup} warm-up, {args.singles} single, {args.studies} back to back"
            )
            runs = [measure_node(demo, studies, args.timeout)]
            if not args.no_peer and isinstance(demo.pacs, OrthancPacs):
                runs.append(measure_router(folder, demo.pacs, studies, args.timeout))
            elif not args.no_peer:
                print(f"no Orthanc router: it needs Orthanc (the PACS here is {demo.pacs.name})")
    print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print_table(runs, args.singles)
    if len(runs) == 2:
        print_comparison(*runs)
    complete = all(len(m.singles) == args.singles and len(m.batch) == m.batch_sent for m in runs)
    return 0 if complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
