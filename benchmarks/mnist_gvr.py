"""The paper's MNIST experiment on real handwriting: turn a 9 into a 4, and check which map is faithful.

scikit-learn ships 1,797 real 8 x 8 digits (``load_digits``; no download). They
are upsampled to 32 x 32, a WGAN-GP generator and an encoder are trained on every
digit but the held-out 4s and 9s, and a logistic latent classifier learns 9
(positive) vs 4. GVR then removes the "9-ness" of held-out 9s: ``G(z*)`` should
look like a 4, and ``G(z0) - G(z*)`` should mark the stroke that closes the loop.

Faithfulness is measured by deletion AUC: pixels are set to the background in
the order a map ranks them (16 steps), and the mean probability of "9" over the
steps is the area under the curve; a faithful map drops the score fastest, so
lower is better. The same captum baselines, Latent Shift and a random order are
run through the same loop. Run through ``python -m benchmarks.rationale mnist``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from inference.bundle import Bundle, load_bundle
from inference.models import ArchitectureConfig, ClassifierConfig, ClassifierKind
from inference.rationale import Explainer, RationaleConfig, explain

logger = logging.getLogger(__name__)

POSITIVE, NEGATIVE = 9, 4
RESOLUTION = 32
DELETION_STEPS = 16


def digits_32() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 N x 32 x 32 with bright strokes on black, labels N)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [np.asarray(Image.fromarray((image / 16.0 * 255).astype(np.uint8)).resize(
        (RESOLUTION, RESOLUTION), Image.Resampling.BICUBIC), dtype=np.uint8) for image in digits.images]
    return np.stack(images), digits.target.astype(int)


def _split(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): 30 % of the 4s and 9s are held out."""
    rng = np.random.default_rng(seed)
    held = []
    for digit in (POSITIVE, NEGATIVE):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        held.append(idx[: int(0.3 * len(idx))])
    held_out = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), held_out), held_out


def train_digit_bundle(images: np.ndarray, labels: np.ndarray, out: Path, quick: bool) -> Bundle:
    """Generator, encoder and 9-vs-4 classifier with the project's training code, exported as a bundle."""
    from training.evaluate import latents_of, roc_auc
    from training.export import export_bundle
    from training.train_classifier import fit, save_classifier
    from training.train_encoder import EncoderTraining, train_encoder
    from training.train_generator import GeneratorTraining, load_generator, train_generator

    arch = ArchitectureConfig(resolution=RESOLUTION, latent_dim=32, generator_channels=12, critic_channels=12,
                              encoder_channels=12)
    steps = 150 if quick else 3000
    train_generator(images, GeneratorTraining(architecture=arch, steps=steps, batch=32, lr=5e-4,
                                              checkpoint_every=steps, log_every=50), out / "g",
                    data_description="sklearn digits")
    generator = load_generator(out / "g")
    train_encoder(images, generator, EncoderTraining(steps=steps // 2, batch=32, lr=1e-3, channels=12, image_weight=5,
                                                     checkpoint_every=steps // 2, log_every=50), out / "e")
    from training.train_encoder import load_encoder

    encoder = load_encoder(out / "e")
    pair = np.isin(labels, (POSITIVE, NEGATIVE))
    z = latents_of(encoder, images[pair])
    y = torch.from_numpy((labels[pair] == POSITIVE).astype(np.float32))
    model = fit(ClassifierConfig(ClassifierKind.LOGISTIC, arch.latent_dim), z, y, epochs=400, lr=1e-2,
                weight_decay=1e-3, seed=0)
    with torch.no_grad():
        train_auc = roc_auc(y.numpy().astype(bool), model.predict_proba(z).numpy())
    save_classifier(out / "c", model, {"decision_threshold": 0.5, "val_auc": train_auc, "n_val": int(pair.sum())},
                    "classifier", {"bnp_threshold": 100.0, "data": f"sklearn digits {POSITIVE} vs {NEGATIVE}"})
    export_bundle(out / "g", out / "e", out / "c", out / "bundle", name="digits", version="0.1.0")
    return load_bundle(out / "bundle")


def deletion_auc(bundle: Bundle, images: torch.Tensor, maps: np.ndarray) -> np.ndarray:
    """Per image: mean p(9) while the map's highest-ranked pixels are set to background, 0 to 100 %."""
    n, r = len(images), images.shape[-1]
    order = np.argsort(-maps.reshape(n, -1), axis=1, kind="stable")
    scores = np.zeros((n, DELETION_STEPS + 1))
    flat = images.reshape(n, -1).clone()
    for step in range(DELETION_STEPS + 1):
        count = round(step * r * r / DELETION_STEPS)
        current = flat.clone()
        for i in range(n):
            current[i, order[i, :count]] = -1.0
        with torch.no_grad():
            scores[:, step] = bundle.classifier.predict_proba(
                bundle.encoder.encode(current.reshape(n, 1, r, r))).numpy()
    return np.asarray(np.trapezoid(scores, dx=1.0 / DELETION_STEPS, axis=1))


def mnist_experiment(out: Path, quick: bool = False) -> dict[str, Any]:
    """Train, explain held-out 9s with every method, score deletion AUC; table, figure and JSON in ``out``."""
    from benchmarks.rationale_baselines import all_explainers

    images, labels = digits_32()
    train, held_out = _split(labels)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gvr-digits-") as tmp:
        bundle = train_digit_bundle(images[train], labels[train], Path(tmp), quick)
    training_s = time.perf_counter() - started
    nines = held_out[labels[held_out] == POSITIVE]
    x = torch.from_numpy(images[nines]).float().div(127.5).sub(1.0)[:, None]
    with torch.no_grad():
        p0 = bundle.classifier.predict_proba(bundle.encoder.encode(x)).numpy()
    x = x[p0 >= 0.5]
    config = RationaleConfig(target=0.1, weight=5.0, max_steps=300)
    explainers: dict[str, Explainer] = {**all_explainers(bundle, config),
                                        "Random": lambda t: torch.rand(len(t), *t.shape[2:])}
    rows, examples = [], {}
    torch.manual_seed(0)
    for name, explainer in explainers.items():
        maps = np.concatenate([explainer(x[i:i + 16]).numpy() for i in range(0, len(x), 16)])
        auc = deletion_auc(bundle, x, maps)
        rows.append({"method": name, "n": len(x), "deletion_auc": float(auc.mean()),
                     "deletion_auc_sd": float(auc.std())})
        examples[name] = maps[:6]
    result = explain(bundle, x, config)
    validity = float((result.p_star < 0.5).mean())
    out.mkdir(parents=True, exist_ok=True)
    _figure(x[:6, 0].numpy(), result, {k: v for k, v in examples.items() if k != "Random"}, out / "mnist_gvr.png")
    report = {"held_out_nines_positive": len(x), "training_seconds": training_s, "validity_9_to_4": validity,
              "mean_steps": float(result.steps.mean()), "rows": rows}
    (out / "mnist_gvr.json").write_text(json.dumps(report, indent=2) + "\n")
    table = mnist_table(rows)
    (out / "mnist_gvr.md").write_text(table + "\n")
    print(f"\n## MNIST digits: {POSITIVE} -> {NEGATIVE} ({len(x)} held-out 9s; {validity:.0%} of G(z*) "
          f"classified 4; training {training_s:.0f} s)\n\n{table}")
    return report


def mnist_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | n | deletion AUC (lower is better) | sd |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['method']} | {r['n']} | {r['deletion_auc']:.3f} | {r['deletion_auc_sd']:.3f} |" for r in rows]
    return "\n".join(lines)


def _figure(inputs: np.ndarray, result: Any, examples: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ["input 9", "G(z0)", "G(z*)", *examples]
    fig, axes = plt.subplots(len(inputs), len(columns), figsize=(1.4 * len(columns), 1.4 * len(inputs)),
                             squeeze=False)
    for row in range(len(inputs)):
        panels = [(inputs[row], "gray"), (result.reconstruction[row], "gray"), (result.healthy[row], "gray")]
        panels += [(examples[name][row], "bwr") for name in examples]
        for col, (image, cmap) in enumerate(panels):
            ax = axes[row][col]
            if cmap == "bwr":
                limit = float(np.abs(image).max()) or 1.0
                ax.imshow(image, cmap=cmap, vmin=-limit, vmax=limit)
            else:
                ax.imshow(image, cmap=cmap, vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
