"""``gvr phantoms``: write synthetic chest radiograph phantoms, their sign masks and labels.csv.

    gvr phantoms --n 200 --seed 0 --out data/phantoms --format dicom
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gvr phantoms",
        description="Write synthetic frontal chest radiographs with heart-failure signs, a pixel mask per "
        "present sign and a labels.csv (BNP, label = BNP >= 100 ng/L, severities, CTR, mask paths).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    what = parser.add_argument_group("what to write")
    what.add_argument("--n", type=int, default=100, help="number of phantoms")
    what.add_argument("--seed", type=int, default=0, help="seed of the first phantom (phantom i uses seed + i)")
    what.add_argument("--size", type=int, default=1024, help="pixels per side")
    where = parser.add_argument_group("where")
    where.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    where.add_argument("--format", choices=("dicom", "png"), default="dicom",
                       help="DICOM DX For Presentation (12-bit) or 8-bit PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm

    from training.phantoms import write_phantoms

    try:
        with tqdm(total=args.n, desc="phantoms", unit="img", file=sys.stderr, disable=args.quiet) as bar:
            csv_path = write_phantoms(args.n, args.seed, args.out, args.format, size=args.size, progress=bar.update)
    except ValueError as error:
        print(f"gvr phantoms: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"gvr phantoms: cannot write to {args.out}: {error}", file=sys.stderr)
        return 1
    print(csv_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
