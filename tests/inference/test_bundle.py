"""Bundles: manifest validation, checksum verification, safetensors round trip."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from inference.bundle import (
    DEMO_BUNDLE,
    MANIFEST_FILE,
    BundleInvalidError,
    BundleManifest,
    WeightsFile,
    default_bundle_path,
    load_bundle,
    read_manifest,
    sha256_of,
)
from inference.models import ArchitectureConfig, ClassifierConfig, Encoder, Generator, LatentClassifier
from training.progress import save_weights

ARCH = ArchitectureConfig(resolution=32, latent_dim=16, generator_channels=8, critic_channels=8, encoder_channels=8)


def _write_bundle(folder: Path) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    models: dict[str, torch.nn.Module] = {
        "generator": Generator(ARCH), "encoder": Encoder(ARCH),
        "classifier": LatentClassifier(ClassifierConfig("mlp", 16, (8,))),
    }
    folder.mkdir(parents=True, exist_ok=True)
    weights = {}
    for role, model in models.items():
        save_weights(model, folder / f"{role}.safetensors")
        weights[role] = WeightsFile(f"{role}.safetensors", sha256_of(folder / f"{role}.safetensors"))
    manifest = BundleManifest(
        name="test", version="0.0.1", created="2026-01-01T00:00:00+00:00", architecture=ARCH,
        classifier=ClassifierConfig("mlp", 16, (8,)), decision_threshold=0.4, bnp_threshold=100.0,
        reconstruction_error={"p50": 0.1, "p95": 0.2, "p99": 0.3}, weights=weights,
        metrics={"auc": 0.9}, training_data={"generator": "test"},
    )
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict()))
    return models


def test_load_bundle_round_trips_models(tmp_path: Path) -> None:
    """What was saved loads back identical, in eval mode, with the manifest's fields."""
    models = _write_bundle(tmp_path)
    bundle = load_bundle(tmp_path)
    assert bundle.manifest.resolution == 32 and bundle.manifest.latent_dim == 16
    assert bundle.manifest.decision_threshold == 0.4
    z = torch.randn(2, 16)
    torch.testing.assert_close(bundle.generator.decode(z), models["generator"](z))
    torch.testing.assert_close(bundle.classifier.predict_proba(z), torch.sigmoid(models["classifier"](z)))
    assert not any(m.training for m in (bundle.generator, bundle.encoder, bundle.classifier))
    assert bundle.overfit_classifier is None


def test_load_bundle_refuses_tampered_weights(tmp_path: Path) -> None:
    """One flipped byte: BundleInvalidError naming the file and both digests."""
    _write_bundle(tmp_path)
    expected = read_manifest(tmp_path).weights["encoder"].sha256
    path = tmp_path / "encoder.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleInvalidError, match="encoder.safetensors") as info:
        load_bundle(tmp_path)
    assert expected in str(info.value) and sha256_of(path) in str(info.value)


def test_load_bundle_refuses_missing_weights(tmp_path: Path) -> None:
    """A listed weights file that is absent is named."""
    _write_bundle(tmp_path)
    (tmp_path / "classifier.safetensors").unlink()
    with pytest.raises(BundleInvalidError, match="classifier.safetensors is missing"):
        load_bundle(tmp_path)


def test_load_bundle_refuses_folder_without_manifest(tmp_path: Path) -> None:
    """An empty folder is not a bundle."""
    with pytest.raises(BundleInvalidError, match="manifest.json is missing"):
        load_bundle(tmp_path)


def test_bundle_manifest_validates_itself(tmp_path: Path) -> None:
    """Out-of-range threshold, unordered percentiles, path escapes and latent mismatch are refused."""
    _write_bundle(tmp_path)
    manifest = read_manifest(tmp_path)
    with pytest.raises(BundleInvalidError, match="probability"):
        replace(manifest, decision_threshold=1.5)
    with pytest.raises(BundleInvalidError, match="p50 <= p95 <= p99"):
        replace(manifest, reconstruction_error={"p50": 0.3, "p95": 0.2, "p99": 0.1})
    with pytest.raises(BundleInvalidError, match="latent size"):
        replace(manifest, classifier=ClassifierConfig("logistic", 8))
    with pytest.raises(BundleInvalidError, match="plain"):
        WeightsFile("../x.safetensors", "0" * 64)
    data = manifest.to_dict()
    data["resolution"] = 64
    with pytest.raises(BundleInvalidError, match="resolution"):
        BundleManifest.from_dict(data)


def test_bundle_manifest_round_trips_through_json(tmp_path: Path) -> None:
    """to_dict -> JSON -> from_dict gives an equal manifest."""
    _write_bundle(tmp_path)
    manifest = read_manifest(tmp_path)
    assert BundleManifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest


def test_default_bundle_path_is_the_demo_bundle() -> None:
    """The shipped demo bundle loads, verified, at the paper's 128 x 128, with a fixed overlay colour scale."""
    assert default_bundle_path() == DEMO_BUNDLE
    if not (DEMO_BUNDLE / MANIFEST_FILE).exists():
        pytest.skip("the demo bundle is not trained yet: scripts/train-demo-bundle.sh")
    bundle = load_bundle(DEMO_BUNDLE)
    assert bundle.manifest.resolution == 128
    assert bundle.manifest.architecture.generator_body == "upsample"
    assert bundle.manifest.rationale_scale is not None and 0 < bundle.manifest.rationale_scale <= 1
    assert bundle.encoder.encode(torch.zeros(1, 1, 128, 128)).shape == (1, bundle.manifest.latent_dim)
