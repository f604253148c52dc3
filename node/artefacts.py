"""What an inference job leaves in the spool for delivery: the contract between the two queues.

The GPU worker (``inference.tasks``) writes, the ``dicom`` worker (``node.deliver_results``)
reads. Numbers go in ``result.json``; pixel maps as ``.npy`` files beside it, all at the
source image's own pixel grid (rows x columns) unless named ``model_*``::

    <spool>/results/<job_id>/result.json
    <spool>/results/<job_id>/<image_key>/rationale.npy     float32, signed, display units (an intensity
                                                            difference on [0, 1]): (G(z0) - G(z*)) / 2
                                                            mapped back; positive = speaks for disease
    <spool>/results/<job_id>/<image_key>/reconstruction.npy float32 in [0, 1]: G(z0) mapped back
    <spool>/results/<job_id>/<image_key>/cine.npy          float32 [frames, R, R] in [0, 1], model space,
                                                            from G(z0) to G(z*)

No healthy image is stored: the one a reader sees is the source as displayed
minus the rationale (``node.results.overlay.healthy_image``), so the node derives
it from the source and ``rationale.npy`` and it can never disagree with the
overlay (and a 2048 px source does not cost another 16 MB of spool).

This module stays free of torch: the node reads it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RESULT_FILE = "result.json"
ARRAY_NAMES = ("rationale", "reconstruction", "cine")
DEFAULT_RATIONALE_SCALE = 0.10  # display units drawn at full colour when the bundle fixes none


@dataclass(frozen=True)
class ModelInfo:
    """The bundle facts the pictures and the report need.

    ``rationale_scale`` is the bundle's fixed colour scale (``display.rationale_scale``):
    the |rationale| in display units drawn at full colour, the same for every
    patient so colour means the same everywhere. None (an older bundle) falls back
    to DEFAULT_RATIONALE_SCALE, never to a per-image scale.
    """

    name: str
    version: str
    threshold: float  # decision threshold on the probability
    bnp_threshold: float = 100.0
    rationale_scale: float | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.version:
            raise ValueError("model name and version are required")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"decision threshold {self.threshold} must lie in (0, 1)")
        if self.rationale_scale is not None and not 0.0 < self.rationale_scale <= 1.0:
            raise ValueError(f"rationale scale {self.rationale_scale} must lie in (0, 1] (display units)")

    @property
    def colour_scale(self) -> float:
        """The |rationale| drawn at full colour: the bundle's, else DEFAULT_RATIONALE_SCALE."""
        return self.rationale_scale if self.rationale_scale is not None else DEFAULT_RATIONALE_SCALE


@dataclass(frozen=True)
class ImageResult:
    """The prediction and rationale for one source image of the job."""

    key: str  # folder name under the job's result dir (the source SOP Instance UID)
    source_sop_instance_uid: str
    source_path: str  # the spooled source instance
    probability: float  # p0 = f(E(x))
    probability_healthy: float  # p* = f(z*): the model's probability after the disease is removed
    positive: bool  # probability >= threshold
    steps: int
    ood_score: float  # mean |x - G(E(x))|
    ood_flag: bool  # above the bundle's 99th percentile
    estimated_bnp: float | None = None

    def __post_init__(self) -> None:
        for name in ("probability", "probability_healthy"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} {value} must lie in [0, 1]")
        if self.steps < 0:
            raise ValueError(f"steps {self.steps} must not be negative")

    @property
    def finding(self) -> str:
        """The finding as burned in: none for an image unlike the training data (its p is unreliable)."""
        if self.ood_flag:
            return "no finding (image unlike the training data)"
        return "heart failure likely" if self.positive else "heart failure unlikely"


@dataclass(frozen=True)
class JobResult:
    job_id: str
    model: ModelInfo
    device: str
    images: tuple[ImageResult, ...] = field(default_factory=tuple)
    seconds: float = 0.0
    # the instance number of the first image's results: a late job of an analysed study numbers
    # its objects after the earlier jobs' in the same result series
    first_number: int = 1

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError(f"job {self.job_id} has no image results")


def job_dir(results_root: Path, job_id: str) -> Path:
    return results_root / job_id


def write_job_result(results_root: Path, result: JobResult, arrays: dict[str, dict[str, np.ndarray]]) -> Path:
    """Write arrays then ``result.json`` last (atomically): its presence means complete.

    ``arrays`` maps image key -> {name in ARRAY_NAMES: array}.
    """
    folder = job_dir(results_root, result.job_id)
    for image in result.images:
        image_dir = folder / image.key
        image_dir.mkdir(parents=True, exist_ok=True)
        for name, array in arrays.get(image.key, {}).items():
            if name not in ARRAY_NAMES:
                raise ValueError(f"unknown artefact {name!r}; expected one of {ARRAY_NAMES}")
            _atomic_write(image_dir / f"{name}.npy", lambda handle, a=array: np.save(handle, a))
    payload = json.dumps(asdict(result), indent=2, sort_keys=True).encode()
    _atomic_write(folder / RESULT_FILE, lambda handle: handle.write(payload))
    return folder


def read_job_result(results_root: Path, job_id: str) -> JobResult:
    """Raises FileNotFoundError while the job has no complete result."""
    data = json.loads((job_dir(results_root, job_id) / RESULT_FILE).read_text())
    return JobResult(
        job_id=data["job_id"],
        model=ModelInfo(**data["model"]),
        device=data["device"],
        images=tuple(ImageResult(**image) for image in data["images"]),
        seconds=float(data.get("seconds", 0.0)),
        first_number=int(data.get("first_number", 1)),
    )


def load_array(results_root: Path, job_id: str, image_key: str, name: str) -> np.ndarray:
    if name not in ARRAY_NAMES:
        raise ValueError(f"unknown artefact {name!r}; expected one of {ARRAY_NAMES}")
    array: np.ndarray = np.load(job_dir(results_root, job_id) / image_key / f"{name}.npy", allow_pickle=False)
    return array


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
