"""``gvr phantoms``: write synthetic chest radiograph phantoms, their sign masks and labels.csv.

gvr phantoms --n 200 --seed 0 --out data/phantoms --format dicom
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from node.cli.common import HelpFormatter

if TYPE_CHECKING:
    from PIL import Image


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gvr phantoms",
        description="Write synthetic frontal chest radiographs with heart-failure signs, a pixel mask per "
        "present sign and a labels.csv (BNP, label = BNP >= 100 ng/L, severities, CTR, mask paths).",
        formatter_class=HelpFormatter,
    )
    what = parser.add_argument_group("what to write")
    what.add_argument("--n", type=int, default=100, help="number of phantoms")
    what.add_argument(
        "--seed", type=int, default=0, help="seed of the first phantom (phantom i uses seed + i)"
    )
    what.add_argument("--size", type=int, default=1024, help="pixels per side")
    what.add_argument("--twins", action="store_true",
                      help="also write each phantom's healthy twin (same patient, no signs) to twins/")
    where = parser.add_argument_group("where")
    where.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    where.add_argument(
        "--format",
        choices=("dicom", "png"),
        default="dicom",
        help="DICOM DX For Presentation (12-bit) or 8-bit PNG",
    )
    where.add_argument(
        "--preview",
        type=Path,
        default=None,
        help="also write a PNG grid of the first 8 phantoms with their sign masks outlined",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


# outline colours of the sign masks in the preview (RGB)
MASK_COLOURS = {
    "cardiomegaly": (255, 70, 70),
    "effusion": (70, 150, 255),
    "venous_diversion": (255, 200, 0),
    "edema": (60, 220, 90),
}


SHORT = {"cardiomegaly": "cardio", "effusion": "effusion", "venous_diversion": "veins", "edema": "edema"}


def render_preview(seeds: list[int], size: int = 320) -> Image.Image:
    """A grid of phantoms (top: as seen; bottom: masks tinted and outlined) with BNP, label and CTR captions."""
    import numpy as np
    from PIL import Image, ImageDraw

    from training.phantoms import SIGNS, make_phantom

    caption = 34
    columns = (len(seeds) + 1) // 2 if len(seeds) > 4 else len(seeds)
    rows = (len(seeds) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * size, rows * (2 * size + caption)), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for index, seed in enumerate(seeds):
        phantom = make_phantom(seed, size)
        grey = np.repeat(phantom.image[..., None] * 255.0, 3, axis=2)
        tinted = grey.copy()
        for name in SIGNS:
            mask = phantom.masks[name]
            inner = (
                mask & np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1)
            )
            colour = np.array(MASK_COLOURS[name], dtype=np.float64)
            tinted[mask] = 0.75 * tinted[mask] + 0.25 * colour
            tinted[mask & ~inner] = colour
        x, y = (index % columns) * size, (index // columns) * (2 * size + caption)
        sheet.paste(Image.fromarray(np.concatenate([grey, tinted]).astype(np.uint8)), (x, y + caption))
        signs = " ".join(f"{SHORT[name]} {value:.2f}" for name, value in phantom.severities.items() if value)
        verdict = "HF+" if phantom.label else "HF-"
        draw.text(
            (x + 4, y + 2),
            f"#{seed} {verdict} BNP {phantom.bnp:.0f} CTR {phantom.ctr:.2f}",
            fill=(255, 255, 255),
        )
        draw.text((x + 4, y + 17), signs or "no signs", fill=(200, 200, 200))
    return sheet


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm

    from training.phantoms import write_phantoms

    try:
        with tqdm(total=args.n, desc="phantoms", unit="img", file=sys.stderr, disable=args.quiet) as bar:
            csv_path = write_phantoms(
                args.n, args.seed, args.out, args.format, size=args.size, progress=bar.update,
                twins=args.twins,
            )
    except ValueError as error:
        print(f"gvr phantoms: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"gvr phantoms: cannot write to {args.out}: {error}", file=sys.stderr)
        return 1
    if args.preview is not None:
        seeds = list(range(args.seed, args.seed + min(args.n, 8)))
        render_preview(seeds, size=256).save(args.preview)  # 256 px: big enough for the captions
    print(csv_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
