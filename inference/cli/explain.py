"""``gvr explain FILE ... --out DIR``: predict and explain radiographs offline, no server needed.

For each file, a folder ``DIR/<name>/`` with, at the source's own resolution,
``input.png`` (the source as displayed), ``reconstruction.png`` (the model's
decoding), ``healthy.png`` (the source minus the rationale) and ``rationale.png``
(the overlay the PACS would receive: grey, and saying why, for a negative);
for a shown rationale also ``side-by-side.png`` and ``cine.gif`` (the model's
decodings, from the image to its healthy version) as the PACS gets them; the
raw maps at model resolution, float32 in model space, for other tools to score:
``rationale.npy`` (``G(z0) - G(z*)``, positive = speaks for disease) and
``healthy.npy`` (the model image with the disease removed); and ``result.json``.
``DIR/summary.json`` lists every file, including those that could not be used
and why. Exit status 0 when every file was explained, 1 when
some were not, 2 for bad options or a bad bundle.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from node.cli.common import HelpFormatter, setup_logging

if TYPE_CHECKING:
    from node.artefacts import ModelInfo

log = logging.getLogger("gvr.explain")


def _rationale_defaults() -> Any:
    from inference.rationale import RationaleConfig

    return RationaleConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gvr explain",
        description="Predict heart failure and draw the Generative Visual Rationale of DICOM (or PNG) files.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="DICOM files (PNG/JPEG also read)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the pictures and JSON")
    parser.add_argument("--bundle", type=Path, default=None, help="model bundle folder (default: the demo bundle)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int, default=16, help="images per optimisation batch")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    rationale = parser.add_argument_group("rationale (defaults: inference.rationale.RationaleConfig)")
    defaults = _rationale_defaults()
    rationale.add_argument("--weight", type=float, default=defaults.weight,
                           help="lambda: weight of the image distance")
    rationale.add_argument("--distance", choices=("l1", "l2"), default=defaults.distance.value, help="image distance")
    rationale.add_argument("--prior-weight", type=float, default=defaults.prior_weight,
                           help="weight of the latent prior (0: off)")
    rationale.add_argument("--target", type=float, default=None,
                           help="the classifier term lets go below this probability (default: half the threshold)")
    rationale.add_argument("--noise-floor", type=float, default=None,
                           help="changes smaller than this (model units) are shrunk off the rationale "
                                "(default: the bundle's median reconstruction error; 0: off)")
    rationale.add_argument("--max-steps", type=int, default=defaults.max_steps, help="Adam steps at most")
    rationale.add_argument("--lr", type=float, default=defaults.lr, help="Adam learning rate")
    rationale.add_argument("--frames", type=int, default=defaults.frames, help="cine frames, both ends included")
    rationale.add_argument("--seed", type=int, default=0, help="seed (the optimisation is deterministic)")
    return parser


@dataclass(frozen=True)
class _Loaded:
    path: Path
    name: str
    image: np.ndarray
    geometry: Any
    base: np.ndarray
    sop_instance_uid: str | None


def _load(path: Path, name: str, resolution: int) -> _Loaded:
    """Model image, geometry and the display image of one file; raises UnusableImageError."""
    from inference.preprocess import (
        UnusableImageError,
        dicom_to_model_image,
        image_file_to_model_image,
        is_dicom_file,
    )
    from node.results.overlay import display_image

    if is_dicom_file(path):
        import pydicom
        from pydicom.errors import InvalidDicomError

        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError) as exc:
            raise UnusableImageError(f"not a readable DICOM file: {exc}") from exc
        image, geometry = dicom_to_model_image(ds, resolution)
        return _Loaded(path, name, image, geometry, display_image(ds), str(ds.get("SOPInstanceUID", "")) or None)
    from PIL import Image

    image, geometry = image_file_to_model_image(path, resolution)
    with Image.open(path) as picture:
        base = np.asarray(picture.convert("L"), dtype=np.float32) / 255.0
    return _Loaded(path, name, image, geometry, base, None)


def _names(paths: list[Path]) -> list[str]:
    """A distinct folder name per file: its stem, with -2, -3 ... on a clash."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        stem = path.stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


def model_info(manifest: Any) -> ModelInfo:
    """The bundle facts the pictures need (``node.artefacts.ModelInfo``), its fixed colour scale included."""
    from node.artefacts import ModelInfo

    return ModelInfo(manifest.name, manifest.version, manifest.decision_threshold, manifest.bnp_threshold,
                     manifest.rationale_scale)


def _record(item: _Loaded, explanation: Any, manifest: Any, config: Any) -> dict[str, Any]:
    threshold = manifest.decision_threshold
    return {
        "file": str(item.path), "sop_instance_uid": item.sop_instance_uid, "folder": item.name,
        "probability": explanation.probability, "probability_healthy": explanation.probability_healthy,
        "positive": explanation.probability >= threshold,
        "decision_threshold": threshold, "target": config.target_for(threshold), "steps": explanation.steps,
        "ood_score": explanation.ood_score, "ood_flag": explanation.ood_flag,
        "ood_p99": manifest.reconstruction_error["p99"],
        "rationale_max_abs": float(np.abs(explanation.rationale).max() / 2.0),
        "rationale_scale": model_info(manifest).colour_scale,
        "proximity": float(np.abs(explanation.healthy - explanation.reconstruction).mean() / 2.0),
        "model": {"name": manifest.name, "version": manifest.version, "resolution": manifest.resolution},
        "rationale_config": {**asdict(config), "distance": config.distance.value},
    }


def _write(item: _Loaded, explanation: Any, bundle: Any, config: Any, out: Path) -> dict[str, Any]:
    from inference.predict import artefact_maps
    from inference.render import write_model_maps, write_pictures
    from node.artefacts import ImageResult
    from node.results.overlay import Caption

    manifest = bundle.manifest
    record = _record(item, explanation, manifest, config)
    model = model_info(manifest)
    image = ImageResult(key=item.name, source_sop_instance_uid=item.sop_instance_uid or "",
                        source_path=str(item.path), probability=record["probability"],
                        probability_healthy=record["probability_healthy"], positive=record["positive"],
                        steps=record["steps"], ood_score=record["ood_score"], ood_flag=record["ood_flag"])
    record["finding"] = image.finding  # as burned in: no finding for an image unlike the training data
    folder = out / item.name
    write_pictures(folder, item.base, artefact_maps(explanation, item.geometry), Caption.for_image(model, image))
    write_model_maps(folder, explanation.rationale, explanation.counterfactual)
    (folder / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from tqdm import tqdm

    from inference.bundle import BundleInvalidError
    from inference.predict import explain_images, resolve_bundle
    from inference.preprocess import UnusableImageError
    from inference.rationale import RationaleConfig

    try:
        config = RationaleConfig(weight=args.weight, distance=args.distance, prior_weight=args.prior_weight,
                                 target=args.target, lr=args.lr, max_steps=args.max_steps, frames=args.frames,
                                 seed=args.seed, noise_floor=args.noise_floor)
        if args.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch}")
        bundle = resolve_bundle(args.bundle, args.device)
    except (ValueError, BundleInvalidError) as error:
        log.error("%s", error)
        return 2
    progress = tqdm(total=len(args.files), desc="explain", unit="image", file=sys.stderr,
                    disable=len(args.files) < 2)
    loaded, failures = [], []
    for path, name in zip(args.files, _names(args.files), strict=True):
        try:
            loaded.append(_load(path, name, bundle.manifest.resolution))
        except UnusableImageError as error:
            log.warning("%s: not used: %s", path, error)
            failures.append({"file": str(path), "error": str(error)})
            progress.update(1)
    explanations = explain_images(bundle, [item.image for item in loaded], config, args.batch,
                                  on_batch=progress.update)
    progress.close()
    args.out.mkdir(parents=True, exist_ok=True)
    records = [_write(item, explanation, bundle, config, args.out)
               for item, explanation in zip(loaded, explanations, strict=True)]
    summary = {"bundle": str(bundle.path), "images": records, "not_used": failures}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for record in records:
        print(f"{record['file']}: p = {record['probability']:.3f} ({record['probability_healthy']:.3f} after removal) "
              f"({record['finding']}, {record['steps']} steps{', OUT OF DISTRIBUTION' if record['ood_flag'] else ''})")
    print(f"wrote {len(records)} explanation(s) to {args.out}" + (f"; {len(failures)} file(s) not used"
                                                                  if failures else ""))
    return 1 if failures else 0
