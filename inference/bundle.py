"""Versioned model bundles: a folder with ``manifest.json`` and safetensors weights.

The manifest says everything a worker needs to use the models without the
training code: sizes, architecture, preprocessing, the decision threshold, the
BNP threshold that defined the label, held-out metrics, reconstruction-error
percentiles for the out-of-distribution flag, the fixed colour scale of the
rationale overlay (``display.rationale_scale``), and the sha256 of every weights
file. ``load_bundle`` checks every digest before it reads a tensor, and reads
tensors only with safetensors: a bundle is never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from inference.models import ArchitectureConfig, ClassifierConfig, Encoder, Generator, LatentClassifier

logger = logging.getLogger(__name__)

DEMO_BUNDLE = Path(__file__).parent / "bundles" / "demo"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
REQUIRED_WEIGHTS = ("generator", "encoder", "classifier")
OPTIONAL_WEIGHTS = ("overfit_classifier",)


class BundleInvalidError(ValueError):
    """A bundle folder is incomplete, inconsistent or has a weights file whose digest does not match."""


def default_bundle_path() -> Path:
    """The bundle shipped with the code (trained on synthetic phantoms; not for clinical use)."""
    return DEMO_BUNDLE


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class WeightsFile:
    path: str
    sha256: str

    def __post_init__(self) -> None:
        if "/" in self.path or "\\" in self.path or self.path.startswith(".") or not self.path.endswith(
                ".safetensors"):
            raise BundleInvalidError(f"weights file {self.path!r} must be a plain *.safetensors name in the bundle")
        if len(self.sha256) != 64 or any(ch not in "0123456789abcdef" for ch in self.sha256):
            raise BundleInvalidError(f"weights file {self.path!r}: sha256 {self.sha256!r} is not 64 hex digits")


def _percentiles_valid(values: dict[str, float]) -> bool:
    keys = ("p50", "p95", "p99")
    return all(k in values and values[k] >= 0 for k in keys) and values["p50"] <= values["p95"] <= values["p99"]


@dataclass(frozen=True)
class BundleManifest:
    """What ``manifest.json`` holds; validates itself on construction."""

    name: str
    version: str
    created: str
    architecture: ArchitectureConfig
    classifier: ClassifierConfig
    decision_threshold: float
    bnp_threshold: float
    reconstruction_error: dict[str, float]
    weights: dict[str, WeightsFile]
    preprocessing: dict[str, Any] = field(default_factory=dict)
    training_data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    overfit_classifier: ClassifierConfig | None = None
    format_version: int = FORMAT_VERSION
    display: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise BundleInvalidError(f"bundle name must be letters, digits, '-', '_' or '.', got {self.name!r}")
        if not self.version:
            raise BundleInvalidError("bundle version must not be empty")
        try:
            datetime.fromisoformat(self.created)
        except ValueError as exc:
            raise BundleInvalidError(f"created {self.created!r} is not an ISO 8601 time") from exc
        if self.format_version != FORMAT_VERSION:
            raise BundleInvalidError(f"bundle format {self.format_version} is not supported (need {FORMAT_VERSION})")
        if self.classifier.latent_dim != self.architecture.latent_dim:
            raise BundleInvalidError(f"classifier latent size {self.classifier.latent_dim} != generator latent "
                                     f"size {self.architecture.latent_dim}")
        if not 0.0 <= self.decision_threshold <= 1.0:
            raise BundleInvalidError(f"decision_threshold is a probability, got {self.decision_threshold!r}")
        if not self.bnp_threshold > 0:
            raise BundleInvalidError(f"bnp_threshold must be > 0 ng/L, got {self.bnp_threshold!r}")
        if not _percentiles_valid(self.reconstruction_error):
            raise BundleInvalidError(f"reconstruction_error needs ordered p50 <= p95 <= p99, got "
                                     f"{self.reconstruction_error!r}")
        missing = [name for name in REQUIRED_WEIGHTS if name not in self.weights]
        if missing:
            raise BundleInvalidError(f"manifest lists no weights for {missing}")
        unknown = set(self.weights) - set(REQUIRED_WEIGHTS) - set(OPTIONAL_WEIGHTS)
        if unknown:
            raise BundleInvalidError(f"manifest lists unknown weights {sorted(unknown)}")
        if ("overfit_classifier" in self.weights) != (self.overfit_classifier is not None):
            raise BundleInvalidError("overfit_classifier weights and configuration must come together")
        scale = self.display.get("rationale_scale")
        if scale is not None and not (0 < scale <= 1):
            raise BundleInvalidError(f"display.rationale_scale is an intensity difference in (0, 1], got {scale!r}")

    @property
    def rationale_scale(self) -> float | None:
        """The |rationale| (display units, [0, 1] intensity) drawn at full colour for every patient, if fixed."""
        return self.display.get("rationale_scale")

    @property
    def resolution(self) -> int:
        return self.architecture.resolution

    @property
    def latent_dim(self) -> int:
        return self.architecture.latent_dim

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version, "name": self.name, "version": self.version,
            "created": self.created, "resolution": self.resolution, "latent_dim": self.latent_dim,
            "architecture": self.architecture.to_dict(), "classifier": self.classifier.to_dict(),
            "overfit_classifier": self.overfit_classifier.to_dict() if self.overfit_classifier else None,
            "preprocessing": self.preprocessing, "decision_threshold": self.decision_threshold,
            "bnp_threshold": self.bnp_threshold, "training_data": self.training_data, "metrics": self.metrics,
            "reconstruction_error": self.reconstruction_error, "display": self.display,
            "weights": {name: asdict(w) for name, w in self.weights.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BundleManifest:
        try:
            overfit = data.get("overfit_classifier")
            manifest = cls(
                name=str(data["name"]), version=str(data["version"]), created=str(data["created"]),
                architecture=ArchitectureConfig.from_dict(data["architecture"]),
                classifier=ClassifierConfig.from_dict(data["classifier"]),
                decision_threshold=float(data["decision_threshold"]),
                bnp_threshold=float(data["bnp_threshold"]),
                reconstruction_error={k: float(v) for k, v in data["reconstruction_error"].items()},
                weights={k: WeightsFile(**v) for k, v in data["weights"].items()},
                preprocessing=dict(data.get("preprocessing", {})),
                training_data=dict(data.get("training_data", {})), metrics=dict(data.get("metrics", {})),
                overfit_classifier=ClassifierConfig.from_dict(overfit) if overfit else None,
                format_version=int(data.get("format_version", FORMAT_VERSION)),
                display={k: float(v) for k, v in data.get("display", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, BundleInvalidError):
                raise
            raise BundleInvalidError(f"manifest is malformed: {exc!r}") from exc
        if "resolution" in data and int(data["resolution"]) != manifest.resolution:
            raise BundleInvalidError(f"manifest resolution {data['resolution']} != architecture "
                                     f"{manifest.resolution}")
        return manifest


@dataclass(frozen=True)
class Bundle:
    """Loaded, verified models in eval mode."""

    path: Path
    manifest: BundleManifest
    generator: Generator
    encoder: Encoder
    classifier: LatentClassifier
    overfit_classifier: LatentClassifier | None = None


def verify_weights(path: Path, manifest: BundleManifest) -> None:
    """Raise BundleInvalidError naming the file and both digests when a weights file differs."""
    for role, weights in manifest.weights.items():
        file = path / weights.path
        if not file.is_file():
            raise BundleInvalidError(f"bundle {path}: {role} weights file {weights.path} is missing")
        actual = sha256_of(file)
        if actual != weights.sha256:
            raise BundleInvalidError(f"bundle {path}: {weights.path} has sha256 {actual}, the manifest expects "
                                     f"{weights.sha256}; the file was changed or corrupted: re-export the bundle")


def read_manifest(path: Path) -> BundleManifest:
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleInvalidError(f"{path} is not a bundle: {MANIFEST_FILE} is missing")
    try:
        data = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleInvalidError(f"{manifest_path} is not valid JSON: {exc}") from exc
    return BundleManifest.from_dict(data)


def _load_module(module: torch.nn.Module, file: Path, device: str) -> None:
    try:
        module.load_state_dict(load_file(str(file), device=device), strict=True)
    except RuntimeError as exc:
        raise BundleInvalidError(f"{file.name} does not match the manifest's architecture: {exc}") from exc
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)


def load_bundle(path: Path | str, device: str = "cpu") -> Bundle:
    """Read, verify and load a bundle; every model is in eval mode with frozen weights.

    Raises:
        BundleInvalidError: missing or malformed manifest, missing file, digest mismatch.
    """
    path = Path(path)
    manifest = read_manifest(path)
    verify_weights(path, manifest)
    generator, encoder = Generator(manifest.architecture), Encoder(manifest.architecture)
    classifier = LatentClassifier(manifest.classifier)
    _load_module(generator, path / manifest.weights["generator"].path, device)
    _load_module(encoder, path / manifest.weights["encoder"].path, device)
    _load_module(classifier, path / manifest.weights["classifier"].path, device)
    overfit = None
    if manifest.overfit_classifier is not None:
        overfit = LatentClassifier(manifest.overfit_classifier)
        _load_module(overfit, path / manifest.weights["overfit_classifier"].path, device)
    logger.info("loaded bundle %s %s from %s", manifest.name, manifest.version, path)
    return Bundle(path, manifest, generator.to(device), encoder.to(device), classifier.to(device),
                  overfit.to(device) if overfit else None)
