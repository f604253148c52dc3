"""Training stages on tiny configurations: losses go down, resume continues, bundles round-trip."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference.bundle import load_bundle
from inference.models import ArchitectureConfig, ClassifierConfig, Generator
from training.data import (
    PhantomRange,
    load_labelled,
    load_unlabelled,
    parse_data_spec,
    quantise,
    to_tensor,
)
from training.evaluate import bootstrap_auc, evaluate_bundle, operating_point, roc_auc
from training.export import export_bundle
from training.progress import read_state
from training.train_autoencoder import AutoencoderTraining, ssim, train_autoencoder
from training.train_classifier import ClassifierTraining, fit, overfit_classifier, select_classifier
from training.train_encoder import EncoderTraining, load_encoder, train_encoder
from training.train_generator import GeneratorTraining, load_generator, train_generator

ARCH = ArchitectureConfig(resolution=32, latent_dim=16, generator_channels=8, critic_channels=8, encoder_channels=8)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    """One torch thread: on a shared 2-core machine two threads spin against other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _blob(radius: float, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A bright disc ("heart") of a given radius on a dark, noisy field, in [-1, 1]."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = size / 2 + rng.normal(0, 1), size / 2 + rng.normal(0, 1)
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < radius**2
    return np.clip(-0.8 + 1.4 * disc + rng.normal(0, 0.05, (size, size)), -1, 1).astype(np.float32)


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x 32 x 32, BNP): BNP grows with the disc radius."""
    rng = np.random.default_rng(0)
    radii = rng.uniform(4, 11, 200)
    images = np.stack([quantise(_blob(r, rng)) for r in radii])
    return images, 20 * (radii - 3) ** 1.5


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, blobs: tuple[np.ndarray, np.ndarray]) -> dict[str, Path]:
    """A generator, encoder and classifier trained for a few steps, shared by later tests."""
    root = tmp_path_factory.mktemp("trained")
    images, bnp = blobs
    g_cfg = GeneratorTraining(architecture=ARCH, steps=20, batch=8, lr=1e-3, checkpoint_every=20)
    train_generator(images, g_cfg, root / "generator")
    generator = load_generator(root / "generator")
    e_cfg = EncoderTraining(steps=60, batch=8, lr=1e-3, channels=8, image_weight=5, log_every=5,
                            checkpoint_every=60)
    train_encoder(images, generator, e_cfg, root / "encoder")
    from training.cli import train as train_cli

    labels_csv = _write_png_csv(root / "labelled", images[:60], bnp[:60])
    assert train_cli.main(["classifier", "--labels", str(labels_csv), "--encoder", str(root / "encoder"),
                           "--generator", str(root / "generator"), "--out", str(root / "classifier"),
                           "--overfit", "--epochs", "30", "--overfit-epochs", "30", "--overfit-hidden", "16"]) == 0
    return {"generator": root / "generator", "encoder": root / "encoder", "classifier": root / "classifier",
            "labels": labels_csv}


def _write_png_csv(folder: Path, images: np.ndarray, bnp: np.ndarray) -> Path:
    """PNGs (upsampled to 64 px, the minimum side) under sub-folders and a labels.csv beside them."""
    (folder / "png").mkdir(parents=True)
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "bnp", "label"])
        for i, (image, value) in enumerate(zip(images, bnp)):
            Image.fromarray(image).resize((64, 64), Image.Resampling.NEAREST).save(folder / "png" / f"{i}.png")
            writer.writerow([f"png/{i}.png", f"{value:.1f}", int(value >= 100)])
    return folder / "labels.csv"


def _records(folder: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_parse_data_spec_phantom_range_and_errors(tmp_path: Path) -> None:
    """phantoms:START-END[@SIZE] parses; a bad spec or a missing path is a ValueError."""
    assert parse_data_spec("phantoms:5-9@128") == PhantomRange(5, 9, 128)
    assert parse_data_spec(str(tmp_path)) == tmp_path
    with pytest.raises(ValueError, match="START <= END"):
        parse_data_spec("phantoms:9-5")
    with pytest.raises(ValueError, match="bad phantom spec"):
        parse_data_spec("phantoms:abc")
    with pytest.raises(ValueError, match="does not exist"):
        parse_data_spec(str(tmp_path / "nope"))


def test_load_unlabelled_reads_nih_layout_and_dicom_without_suffix(tmp_path: Path) -> None:
    """images_001/images/00000001_000.png, a suffix-less DICOM and a README: two images."""
    import pydicom
    from pydicom.data import get_testdata_file

    nih = tmp_path / "images_001" / "images"
    nih.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 80), dtype=np.uint8)).save(
        nih / "00000001_000.png")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    (tmp_path / "dicom").mkdir()
    ds.save_as(tmp_path / "dicom" / "IM0001")
    (tmp_path / "README").write_text("not an image")
    images = load_unlabelled(str(tmp_path), 32, cache_dir=tmp_path / "cache")
    assert images.shape == (2, 32, 32) and images.dtype == np.uint8
    assert np.array_equal(load_unlabelled(str(tmp_path), 32, cache_dir=tmp_path / "cache"), images)


def test_load_labelled_reads_csv_relative_paths(tmp_path: Path, blobs: tuple[np.ndarray, np.ndarray]) -> None:
    """path is relative to the CSV; labels follow the BNP threshold."""
    images, bnp = blobs
    csv_path = _write_png_csv(tmp_path, images[:6], bnp[:6])
    data = load_labelled(str(csv_path), 32, threshold=100)
    assert data.images.shape == (6, 32, 32)
    np.testing.assert_allclose(data.bnp, np.round(bnp[:6], 1))
    assert list(data.labels) == list(np.round(bnp[:6], 1) >= 100)
    assert data.names[0] == "png/0.png"


def test_load_unlabelled_streams_phantoms() -> None:
    """phantoms:0-2 renders three phantoms through the shared preprocessing."""
    pytest.importorskip("training.phantoms", reason="training/phantoms.py has not landed")
    images = load_unlabelled("phantoms:0-2", 32)
    assert images.shape == (3, 32, 32) and images.std() > 5


def test_train_generator_moves_samples_towards_data(tmp_path: Path, blobs: tuple[np.ndarray, np.ndarray]) -> None:
    """After training, the mean generated image is closer to the mean real image than at step 0."""
    images, _ = blobs
    real_mean = to_tensor(images).mean(0)
    torch.manual_seed(0)
    z = torch.randn(128, 16)
    before = (Generator(ARCH).decode(z).mean(0) - real_mean).abs().mean()
    cfg = GeneratorTraining(architecture=ARCH, steps=40, batch=8, lr=1e-3, checkpoint_every=40, log_every=10)
    train_generator(images, cfg, tmp_path)
    with torch.no_grad():
        after = (load_generator(tmp_path).decode(z).mean(0) - real_mean).abs().mean()
    assert float(after) < 0.7 * float(before)
    assert {"wasserstein", "gradient_penalty", "generator_loss"} <= set(_records(tmp_path)[-1])
    assert (tmp_path / "losses.png").stat().st_size > 0 and (tmp_path / "samples.png").exists()


def test_train_generator_resume_equals_uninterrupted(tmp_path: Path, blobs: tuple[np.ndarray, np.ndarray]) -> None:
    """3 steps, then --resume to 6, equals 6 steps in one go; the step counter continues."""
    images, _ = blobs
    cfg = GeneratorTraining(architecture=ARCH, steps=6, batch=8, lr=1e-3, checkpoint_every=3, log_every=1)
    train_generator(images, cfg, tmp_path / "whole")
    train_generator(images, GeneratorTraining(**{**cfg.__dict__, "steps": 3}), tmp_path / "split")
    assert read_state(tmp_path / "split")["step"] == 3
    train_generator(images, cfg, tmp_path / "split", resume=True)
    assert read_state(tmp_path / "split")["step"] == 6
    assert [r["step"] for r in _records(tmp_path / "split")] == [1, 2, 3, 4, 5, 6]
    whole, split = load_generator(tmp_path / "whole"), load_generator(tmp_path / "split")
    for (name, a), (_, b) in zip(whole.state_dict().items(), split.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_train_encoder_lowers_both_losses(trained: dict[str, Path]) -> None:
    """Latent loss and image loss both end lower than they start."""
    records = _records(trained["encoder"])
    first, last = records[0], records[-1]
    assert last["latent_loss"] < first["latent_loss"]
    assert last["image_loss"] < first["image_loss"]
    state = read_state(trained["encoder"])
    assert state["reconstruction_error"]["p50"] <= state["reconstruction_error"]["p99"]


def test_train_encoder_resume_continues_from_checkpoint(tmp_path: Path, trained: dict[str, Path],
                                                         blobs: tuple[np.ndarray, np.ndarray]) -> None:
    """Encoder --resume: 2 + 2 steps equal 4 steps."""
    images, _ = blobs
    generator = load_generator(trained["generator"])
    cfg = EncoderTraining(steps=4, batch=8, channels=8, checkpoint_every=2, log_every=1)
    train_encoder(images, generator, cfg, tmp_path / "whole")
    train_encoder(images, generator, EncoderTraining(**{**cfg.__dict__, "steps": 2}), tmp_path / "split")
    train_encoder(images, generator, cfg, tmp_path / "split", resume=True)
    assert read_state(tmp_path / "split")["step"] == 4
    from training.train_encoder import load_encoder

    x = to_tensor(images[:4])
    torch.testing.assert_close(load_encoder(tmp_path / "whole").encode(x), load_encoder(tmp_path / "split").encode(x),
                               rtol=1e-5, atol=1e-5)


def test_fit_lowers_classifier_loss() -> None:
    """Full-batch fitting lowers the cross-entropy on a separable latent signal."""
    rng = np.random.default_rng(0)
    z = torch.from_numpy(rng.normal(size=(200, 16)).astype(np.float32))
    y = (z[:, 0] + 0.3 * z[:, 1] > 0).float()
    loss = torch.nn.BCEWithLogitsLoss()
    untrained = fit(ClassifierConfig("logistic", 16), z, y, epochs=0, lr=0.01, weight_decay=0, seed=0)
    trained = fit(ClassifierConfig("logistic", 16), z, y, epochs=200, lr=0.01, weight_decay=0, seed=0)
    with torch.no_grad():
        assert float(loss(trained(z), y)) < 0.5 * float(loss(untrained(z), y))


def test_select_classifier_keeps_best_and_overfit_control_memorises() -> None:
    """The kept model has a high validation AUC; the overfit control reaches training AUC 1."""
    rng = np.random.default_rng(1)
    z = torch.from_numpy(rng.normal(size=(300, 16)).astype(np.float32))
    labels = (z[:, 0].numpy() + rng.normal(0, 0.3, 300)) > 0.5
    cfg = ClassifierTraining(epochs=60, overfit_epochs=150, overfit_hidden=32, weight_decays=(1e-3,),
                             kinds=("logistic", "mlp"))
    model, summary = select_classifier(z, labels, cfg)
    assert summary["val_auc"] > 0.9 and 0 <= summary["decision_threshold"] <= 1
    assert summary["kind"] == model.kind.value and len(summary["candidates"]) == 2
    _, overfit = overfit_classifier(z, labels, cfg)
    assert overfit["train_auc"] == 1.0 and overfit["n_train"] == 40


def test_roc_auc_matches_sklearn_with_ties() -> None:
    """Rank AUC (ties half) equals scikit-learn's; bootstrap CI brackets it."""
    metrics = pytest.importorskip("sklearn.metrics", reason="pip install scikit-learn")
    rng = np.random.default_rng(2)
    labels = rng.random(300) > 0.6
    scores = np.round(labels * 0.5 + rng.random(300), 1)
    assert roc_auc(labels, scores) == pytest.approx(metrics.roc_auc_score(labels, scores))
    low, high = bootstrap_auc(labels, scores, n=300)
    assert low < roc_auc(labels, scores) < high
    assert operating_point(labels, scores, 0.0) == (1.0, 0.0)
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(np.ones(4, bool), np.arange(4.0))


def test_export_then_load_and_evaluate_bundle(tmp_path: Path, trained: dict[str, Path],
                                              blobs: tuple[np.ndarray, np.ndarray]) -> None:
    """Export writes a verifiable bundle; evaluation reports AUC with CI and OOD percentiles."""
    manifest = export_bundle(trained["generator"], trained["encoder"], trained["classifier"], tmp_path / "b",
                             "tiny", "0.1.0")
    bundle = load_bundle(tmp_path / "b")
    assert bundle.manifest == manifest and bundle.overfit_classifier is not None
    assert manifest.bnp_threshold == 100.0 and manifest.metrics["source"] == "classifier validation split"
    data = load_labelled(str(trained["labels"]), 32)
    report = evaluate_bundle(bundle, data, tmp_path / "eval", bootstrap=100)
    assert report["auc_ci95"][0] <= report["auc"] <= report["auc_ci95"][1]
    assert report["reconstruction_error"]["p50"] <= report["reconstruction_error"]["p99"]
    for png in ("calibration.png", "reconstruction_error.png", "reconstructions.png"):
        assert (tmp_path / "eval" / png).stat().st_size > 0
    again = export_bundle(trained["generator"], trained["encoder"], trained["classifier"], tmp_path / "b",
                          "tiny", "0.1.1", evaluation=report)
    assert again.metrics["source"] == "held-out evaluation"
    assert again.reconstruction_error == report["reconstruction_error"]


def test_cli_train_generator_on_png_folder_and_resume(tmp_path: Path, blobs: tuple[np.ndarray, np.ndarray]) -> None:
    """gvr train generator runs on a folder, then --resume continues to more steps."""
    from training.cli import train as train_cli

    images, bnp = blobs
    _write_png_csv(tmp_path / "data", images[:20], bnp[:20])
    args = ["generator", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "g"), "--resolution", "32",
            "--latent", "16", "--channels", "8", "--batch", "4", "--checkpoint-every", "2"]
    assert train_cli.main([*args, "--steps", "2"]) == 0
    assert train_cli.main([*args, "--steps", "4", "--resume"]) == 0
    assert read_state(tmp_path / "g")["step"] == 4
    assert train_cli.main(["generator", "--data", "phantoms:3-1", "--out", str(tmp_path / "x")]) == 2


def test_cli_export_and_evaluate(tmp_path: Path, trained: dict[str, Path]) -> None:
    """gvr export writes a bundle, gvr evaluate reports on it, gvr export takes the report."""
    from training.cli import evaluate as evaluate_cli
    from training.cli import export as export_cli

    folders = ["--generator", str(trained["generator"]), "--encoder", str(trained["encoder"]),
               "--classifier", str(trained["classifier"]), "--name", "tiny", "--version", "1"]
    assert export_cli.main([*folders, "--out", str(tmp_path / "b")]) == 0
    assert evaluate_cli.main(["--bundle", str(tmp_path / "b"), "--labels", str(trained["labels"]),
                              "--out", str(tmp_path / "e"), "--bootstrap", "50", "--threads", "1"]) == 0
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["n"] == 60 and report["bundle"] == "tiny 1"
    assert export_cli.main([*folders, "--out", str(tmp_path / "b"), "--evaluation",
                            str(tmp_path / "e" / "report.json")]) == 0
    assert load_bundle(tmp_path / "b").manifest.metrics["auc"] == report["auc"]
    assert evaluate_cli.main(["--bundle", str(tmp_path / "missing"), "--labels", str(trained["labels"]),
                              "--out", str(tmp_path / "e2")]) == 2


def test_train_generator_and_encoder_at_128(tmp_path: Path) -> None:
    """The paper's 128 x 128 trains end to end (two steps each, tiny widths)."""
    arch = ArchitectureConfig(resolution=128, latent_dim=100, generator_channels=4, critic_channels=4)
    images = np.random.default_rng(3).integers(0, 255, (8, 128, 128), dtype=np.uint8)
    train_generator(images, GeneratorTraining(architecture=arch, steps=2, batch=2), tmp_path / "g")
    generator = load_generator(tmp_path / "g")
    assert generator.decode(torch.zeros(1, 100)).shape == (1, 1, 128, 128)
    train_encoder(images, generator, EncoderTraining(steps=2, batch=2, channels=4), tmp_path / "e")
    assert read_state(tmp_path / "e")["architecture"]["resolution"] == 128


def test_train_autoencoder_reconstructs_and_resumes(tmp_path: Path, blobs: tuple[np.ndarray, np.ndarray]) -> None:
    """G and E trained together: SSIM of G(E(x)) rises; out/generator and out/encoder load as ordinary stages;
    a run stopped and resumed ends where an uninterrupted one does."""
    images, _ = blobs
    arch = ArchitectureConfig(resolution=32, latent_dim=16, generator_channels=8, encoder_channels=8)
    cfg = AutoencoderTraining(architecture=arch, steps=40, batch=16, checkpoint_every=20)
    train_autoencoder(images, cfg, tmp_path / "full")
    g, e = load_generator(tmp_path / "full" / "generator"), load_encoder(tmp_path / "full" / "encoder")
    x = to_tensor(images[:32])
    untrained = ArchitectureConfig(resolution=32, latent_dim=16, generator_channels=8, encoder_channels=8)
    torch.manual_seed(0)
    from inference.models import Encoder, Generator

    with torch.no_grad():
        before = ssim(Generator(untrained)(Encoder(untrained)(x)), x).mean()
        after = ssim(g.decode(e.encode(x)), x).mean()
    assert after > before + 0.2, (before, after)
    train_autoencoder(images, cfg, tmp_path / "part", until=13)
    train_autoencoder(images, cfg, tmp_path / "part", resume=True)
    resumed = load_generator(tmp_path / "part" / "generator")
    z = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(resumed.decode(z), g.decode(z), atol=1e-4, rtol=0)


def test_ssim_matches_scikit_image_style_reference() -> None:
    """Identical images score 1; noise lowers SSIM; the score is per image."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-1, 1, (2, 1, 32, 32)).astype(np.float32))
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    noisy = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert (ssim(noisy, x) < 0.9).all()


def _confounded_latents(n: int = 400) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    """Latents where disease moves dims 0-1, and dim 2 (anatomy the twin keeps) is confounded with the label."""
    rng = np.random.default_rng(3)
    severity = rng.uniform(0, 1, n)
    labels = severity > 0.5
    healthy = rng.normal(size=(n, 8)).astype(np.float32)
    healthy[:, 2] += 1.5 * labels  # a confound: correlated with the label, not removed by the disease going away
    z = healthy.copy()
    z[:, :2] += 2.0 * severity[:, None]
    return torch.from_numpy(z), labels, torch.from_numpy(healthy)


def _twin_cosine(model: torch.nn.Module, z: torch.Tensor, twins: torch.Tensor) -> float:
    at = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(at).sum(), at)
    return float(torch.nn.functional.cosine_similarity(-grad, twins - z, dim=1).median())


def test_alignment_term_turns_the_gradient_towards_each_twin() -> None:
    """With the alignment term, -grad f points from a positive to its twin (not along the confound),
    and the classifier still separates the classes."""
    z, labels, twins = _confounded_latents()
    plain_cfg = ClassifierTraining(epochs=150, weight_decays=(1e-3,), latent_noise=0.5)
    aligned_cfg = ClassifierTraining(epochs=150, weight_decays=(1e-3,), latent_noise=0.5, twin_negatives=True,
                                     alignment_weight=1.0)
    plain, _ = select_classifier(z, labels, plain_cfg)
    aligned, summary = select_classifier(z, labels, aligned_cfg, twins)
    positives = torch.from_numpy(labels)
    before = _twin_cosine(plain, z[positives], twins[positives])
    after = _twin_cosine(aligned, z[positives], twins[positives])
    assert after > before + 0.1 and after > 0.8, (before, after)
    assert summary["val_auc"] > 0.85
    assert summary["twin_negatives"] == summary["n_train"]
    assert summary["twin_cosine_median"] == pytest.approx(after, abs=0.2)  # reported on the validation part


def test_twin_options_need_twins() -> None:
    z, labels, _ = _confounded_latents(100)
    with pytest.raises(ValueError, match="twins"):
        select_classifier(z, labels, ClassifierTraining(epochs=5, twin_negatives=True))
    with pytest.raises(ValueError, match="alignment_weight"):
        ClassifierTraining(alignment_weight=-1)


def test_load_labelled_renders_phantom_twins_and_csv_needs_a_twin_column(
        tmp_path: Path, blobs: tuple[np.ndarray, np.ndarray]) -> None:
    """phantoms:A-B with twins: one twin per image, the same where the phantom shows no sign."""
    from training.phantoms import make_phantom

    data = load_labelled("phantoms:0-5@64", 32, twins=True)
    assert data.twins is not None and data.twins.shape == data.images.shape and data.twins.dtype == np.uint8
    signs = [any(v > 0 for v in make_phantom(seed, 64).severities.values()) for seed in range(6)]
    differs = [bool(np.any(data.images[i] != data.twins[i])) for i in range(6)]
    assert any(signs) and differs == signs
    assert load_labelled("phantoms:0-1@64", 32).twins is None
    images, bnp = blobs
    with pytest.raises(ValueError, match="twin"):
        load_labelled(str(_write_png_csv(tmp_path, images[:4], bnp[:4])), 32, twins=True)
