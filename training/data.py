"""Training data: unlabelled image folders, labelled CSVs and streamed phantoms, as model images.

Every source ends as one ``uint8`` array ``N x R x R`` held in memory (the
model image in [-1, 1] quantised to 256 levels): images are decoded and
preprocessed once, through ``inference.preprocess``, the very path inference
uses, and the training loops then sample batches from memory. A data spec is
either a path or ``phantoms:START-END`` (seeds START..END inclusive, optionally
``phantoms:START-END@SIZE`` to render each phantom at SIZE px before the shared
preprocessing), so a demo trains on thousands of phantoms without writing files.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from inference.preprocess import (
    IMAGE_SUFFIXES,
    MIN_SIDE,
    UnusableImageError,
    array_to_model_image,
    image_file_to_model_image,
    is_dicom_file,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")
_PHANTOM_SPEC = re.compile(r"^phantoms:(\d+)-(\d+)(?:@(\d+))?$")


@dataclass(frozen=True)
class PhantomRange:
    """Seeds ``start..end`` inclusive, rendered at ``size`` px (None: at the model resolution)."""

    start: int
    end: int
    size: int | None = None

    def __post_init__(self) -> None:
        if self.start < 0 or self.end < self.start:
            raise ValueError(f"phantom seeds must satisfy 0 <= START <= END, got {self.start}-{self.end}")
        if self.size is not None and self.size < 64:
            raise ValueError(f"phantom render size must be >= 64, got {self.size}")

    @property
    def seeds(self) -> range:
        return range(self.start, self.end + 1)


def parse_data_spec(spec: str) -> Path | PhantomRange:
    """``phantoms:START-END[@SIZE]`` -> PhantomRange; anything else -> Path (must exist)."""
    match = _PHANTOM_SPEC.match(spec)
    if match:
        size = int(match.group(3)) if match.group(3) else None
        return PhantomRange(int(match.group(1)), int(match.group(2)), size)
    if spec.startswith("phantoms:"):
        raise ValueError(f"bad phantom spec {spec!r}; expected phantoms:START-END or phantoms:START-END@SIZE")
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"data path {path} does not exist")
    return path


def find_image_files(root: Path) -> list[Path]:
    """PNG/JPEG and DICOM files (with or without a suffix) under ``root``, recursively, sorted."""
    found = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES or is_dicom_file(path):
            found.append(path)
    return found


def quantise(pixels: np.ndarray) -> np.ndarray:
    """Model image in [-1, 1] -> uint8."""
    return np.clip(np.rint((pixels + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``N x R x R`` -> float32 ``N x 1 x R x R`` in [-1, 1]."""
    return torch.from_numpy(images).float().div_(127.5).sub_(1.0).unsqueeze(1)


def _progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    from tqdm import tqdm

    return iter(tqdm(items, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True, mininterval=2.0))


def _phantom_image(seed: int, resolution: int, size: int | None, twin: bool = False
                   ) -> tuple[np.ndarray, float, np.ndarray | None]:
    """(model image, BNP, and with ``twin`` the healthy twin's model image) of one phantom seed."""
    from training.phantoms import make_phantom, make_twin

    size = size or max(resolution, MIN_SIDE)
    phantom = make_phantom(seed, size=size)
    pixels, _ = array_to_model_image(np.asarray(phantom.image), resolution)
    twin_pixels = quantise(array_to_model_image(make_twin(seed, size), resolution)[0]) if twin else None
    return quantise(pixels), float(phantom.bnp), twin_pixels


def _phantom_chunk(args: tuple[list[int], int, int | None, bool]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    seeds, resolution, size, twins = args
    out = [_phantom_image(seed, resolution, size, twins) for seed in seeds]
    twin_images = np.stack([o[2] for o in out if o[2] is not None]) if twins else None
    return np.stack([o[0] for o in out]), np.array([o[1] for o in out]), twin_images


def render_phantoms(
    phantoms: PhantomRange, resolution: int, workers: int = 1, twins: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(images uint8 N x R x R, bnp N, the healthy twins uint8 N x R x R or None) for every seed of the range.

    A twin goes through the same preprocessing as any image (its own intensity range), as a
    healthy patient's radiograph would."""
    seeds = list(phantoms.seeds)
    chunks = [(seeds[i:i + 64], resolution, phantoms.size, twins) for i in range(0, len(seeds), 64)]
    results: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(_progress(pool.map(_phantom_chunk, chunks), f"phantoms ({len(seeds)})", len(chunks)))
    else:
        for chunk in _progress(chunks, f"phantoms ({len(seeds)})"):
            results.append(_phantom_chunk(chunk))
    twin_images = np.concatenate([r[2] for r in results if r[2] is not None]) if twins else None
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results]), twin_images


def _load_files(paths: Sequence[Path], resolution: int, skip_unusable: bool) -> tuple[np.ndarray, list[int]]:
    images, kept = [], []
    for index, path in enumerate(_progress(paths, "preprocess")):
        try:
            pixels, _ = image_file_to_model_image(path, resolution)
        except UnusableImageError as exc:
            if not skip_unusable:
                raise
            logger.warning("skipping %s: %s", path, exc)
            continue
        images.append(quantise(pixels))
        kept.append(index)
    if not images:
        raise ValueError("no usable image was found")
    return np.stack(images), kept


def _phantom_fingerprint() -> str:
    """Digest of the phantom sources: a cache made by another phantom version is never reused."""
    import training.phantoms as module

    digest = hashlib.sha256()
    for path in sorted(Path(module.__file__).parent.glob("phantom*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _cached(cache_dir: Path | None, key: str, build: Callable[[], np.ndarray]) -> np.ndarray:
    if cache_dir is None:
        return build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"images-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
    if path.is_file():
        logger.info("using cached images %s", path)
        cached: np.ndarray = np.load(path, allow_pickle=False)
        return cached
    images = build()
    np.save(path, images, allow_pickle=False)
    return images


def load_unlabelled(
    spec: str, resolution: int, cache_dir: Path | None = None, workers: int = 1
) -> np.ndarray:
    """All images of a folder (recursively) or a phantom range, as uint8 ``N x R x R``."""
    source = parse_data_spec(spec)

    def build() -> np.ndarray:
        if isinstance(source, PhantomRange):
            return render_phantoms(source, resolution, workers)[0]
        files = [source] if source.is_file() else find_image_files(source)
        if not files:
            raise ValueError(f"no PNG, JPEG or DICOM file under {source}")
        logger.info("found %d image files under %s", len(files), source)
        return _load_files(files, resolution, skip_unusable=True)[0]

    if isinstance(source, PhantomRange):
        key = f"{spec}|{resolution}|{_phantom_fingerprint()}"
    else:
        key = f"{Path(spec).resolve()}|{resolution}"
    return _cached(cache_dir, key, build)


@dataclass(frozen=True)
class LabelledImages:
    """Images with their BNP (ng/L) and the binary label ``bnp >= threshold``; ``twins``, when
    known, is each image's healthy twin (same patient, no signs), row for row."""

    images: np.ndarray
    bnp: np.ndarray
    threshold: float
    names: tuple[str, ...]
    twins: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.ndim != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 N x R x R, got {self.images.dtype} {self.images.shape}")
        if self.bnp.shape != (n,) or len(self.names) != n:
            raise ValueError(f"{n} images but {self.bnp.shape} BNP values and {len(self.names)} names")
        if self.twins is not None and (self.twins.shape != self.images.shape or self.twins.dtype != np.uint8):
            raise ValueError(f"twins must match the images ({self.images.shape} uint8), got {self.twins.dtype} "
                             f"{self.twins.shape}")

    @property
    def labels(self) -> np.ndarray:
        return self.bnp >= self.threshold


def _read_label_csv(path: Path, twins: bool = False) -> tuple[list[Path], list[float], list[Path]]:
    """(image paths, BNP values, twin paths: empty unless ``twins``), paths relative to the CSV."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"path", "bnp"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; columns path and bnp are required")
        if twins and "twin" not in (reader.fieldnames or ()):
            raise ValueError(f"{path}: --twins needs a 'twin' column (each image's healthy twin, e.g. from "
                             "`gvr phantoms --twins`); real radiographs have none: train without --twins")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: no rows")
    try:
        bnp = [float(row["bnp"]) for row in rows]
    except ValueError as exc:
        raise ValueError(f"{path}: a bnp value is not a number: {exc}") from exc
    twin_paths = [path.parent / row["twin"] for row in rows] if twins else []
    return [path.parent / row["path"] for row in rows], bnp, twin_paths


def load_labelled(spec: str, resolution: int, threshold: float = 100.0, workers: int = 1,
                  twins: bool = False) -> LabelledImages:
    """A CSV (columns path, bnp, and twin with ``twins``; paths relative to the CSV) or a phantom
    range, preprocessed once."""
    source = parse_data_spec(spec)
    if isinstance(source, PhantomRange):
        images, bnp, twin_images = render_phantoms(source, resolution, workers, twins)
        names = tuple(f"phantom-{seed}" for seed in source.seeds)
        return LabelledImages(images, bnp.astype(np.float64), threshold, names, twin_images)
    if source.is_dir():
        source = source / "labels.csv"
    paths, bnp_values, twin_paths = _read_label_csv(source, twins)
    images, kept = _load_files(paths, resolution, skip_unusable=True)
    bnp = np.array([bnp_values[i] for i in kept], dtype=np.float64)
    names = tuple(str(paths[i].relative_to(source.parent)) for i in kept)
    twin_images = _load_files([twin_paths[i] for i in kept], resolution, skip_unusable=False)[0] if twins else None
    return LabelledImages(images, bnp, threshold, names, twin_images)
