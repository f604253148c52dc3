"""Generator and encoder trained together as an autoencoder (the demo bundle's method).

Why not the paper's WGAN-GP here: on a 2-core CPU a 128 px WGAN-GP plus a
separate encoder does not reach reconstructions that keep the heart outline,
the domes and the costophrenic angles in the recipe's time budget, and a GVR
can only be as faithful as ``G(E(x))`` is to ``x``. The structure of the method
stays: a generator ``G`` (the decoder), an encoder ``E`` into its latent space,
and a simple classifier on the latent, trained later on a small labelled set.

The loss is ``|G(E(x)) - x|`` plus ``ssim_weight * (1 - SSIM)`` (edges and
texture that L1 alone blurs). Two terms keep the latent space one that a
rationale can walk through: Gaussian noise of ``latent_noise`` (relative to the
latent's own scale) is added to ``E(x)`` before decoding, so nearby latents
decode to nearby, plausible images; and ``prior_weight * mean(z^2)`` keeps the
codes near the origin at unit scale.

Every random draw of a step comes from a stream seeded by (seed, step), so
``--resume`` reproduces the uninterrupted run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from inference.models import ArchitectureConfig, Encoder, Generator
from training.data import to_tensor
from training.progress import (
    METRICS_FILE,
    MetricsLog,
    load_optimizers,
    load_weights,
    plot_losses,
    progress_bar,
    read_state,
    save_checkpoint,
    step_generator,
)
from training.train_encoder import percentiles, reconstruction_errors
from training.train_generator import save_sample_grid, write_grid

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoencoderTraining:
    """Hyper-parameters of one autoencoder run (the architecture is part of it)."""

    architecture: ArchitectureConfig = field(default_factory=lambda: ArchitectureConfig(resolution=128))
    steps: int = 3000
    batch: int = 32
    lr: float = 1e-3
    final_lr: float = 1e-4
    ssim_weight: float = 0.5
    latent_noise: float = 0.1
    prior_weight: float = 1e-3
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 25

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0 < self.final_lr <= self.lr:
            raise ValueError(f"need 0 < final_lr <= lr, got {self.final_lr!r} and {self.lr!r}")
        for name in ("ssim_weight", "latent_noise", "prior_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["architecture"] = self.architecture.to_dict()
        return data

    def lr_at(self, step: int) -> float:
        """Cosine decay from ``lr`` to ``final_lr`` over the run (a fixed function of the step: resumable)."""
        t = min(step / self.steps, 1.0)
        return self.final_lr + 0.5 * (self.lr - self.final_lr) * (1.0 + float(np.cos(np.pi * t)))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: 11 px Gaussian window, sigma 1.5) of images in [-1, 1].

    Computed on the [0, 1] scale (data range 1), valid region only, so it matches
    ``skimage.metrics.structural_similarity(..., gaussian_weights=True, data_range=1)``.
    """
    a, b = (a + 1) / 2, (b + 1) / 2
    window = _gaussian_window().to(a)
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = F.conv2d(a, window), F.conv2d(b, window)
    var_a = F.conv2d(a * a, window) - mu_a**2
    var_b = F.conv2d(b * b, window) - mu_b**2
    cov = F.conv2d(a * b, window) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return index.flatten(1).mean(dim=1)


def _losses(e: Encoder, g: Generator, real: torch.Tensor, cfg: AutoencoderTraining,
            rng: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    codes = e(real)
    noise = torch.randn(codes.shape, generator=rng).to(codes.device)
    scale = codes.detach().std(dim=0, keepdim=True).clamp_min(1e-3)
    recon = g(codes + cfg.latent_noise * scale * noise)
    l1 = (recon - real).abs().mean()
    similarity = ssim(recon, real).mean()
    prior = codes.square().mean()
    loss = l1 + cfg.ssim_weight * (1 - similarity) + cfg.prior_weight * prior
    return loss, {"l1": float(l1.detach()), "ssim": float(similarity.detach()), "latent_sq": float(prior.detach())}


def train_autoencoder(images: np.ndarray, cfg: AutoencoderTraining, out: Path, resume: bool = False,
                      device: torch.device | str = "cpu", data_description: str = "",
                      until: int | None = None) -> dict[str, Any]:
    """Train (or continue) ``G`` and ``E`` together; ``out/generator`` and ``out/encoder`` are ordinary
    training folders (``load_generator``, ``load_encoder`` and ``gvr export`` read them).

    ``until`` stops (with a checkpoint) after that step, as an interruption would: the learning-rate
    schedule still spans ``cfg.steps``, so resuming ends where an uninterrupted run does.
    """
    device = torch.device(device)
    arch = cfg.architecture
    if images.shape[1:] != (arch.resolution,) * 2:
        raise ValueError(f"images are {images.shape[1:]} but the resolution is {arch.resolution}")
    torch.manual_seed(cfg.seed)
    g, e = Generator(arch).to(device), Encoder(arch).to(device)
    opts = {"autoencoder": torch.optim.Adam([*g.parameters(), *e.parameters()], cfg.lr, betas=(0.9, 0.999))}
    start = 0
    if resume and (out / "encoder" / "state.json").exists():
        state = read_state(out / "encoder")
        if ArchitectureConfig.from_dict(state["architecture"]) != arch:
            raise ValueError(f"--resume: {out} holds another architecture: {state['architecture']}")
        load_weights(g, out / "generator" / "generator.safetensors", device)
        load_weights(e, out / "encoder" / "encoder.safetensors", device)
        load_optimizers(out / "encoder", opts)
        start = int(state["step"])
        logger.info("resuming autoencoder training at step %d", start)
    out.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out / METRICS_FILE, resume=resume)
    log.truncate_after(start)
    data = torch.from_numpy(images)
    record: dict[str, Any] = {"step": start}
    for step in progress_bar(cfg.steps, start, "autoencoder"):
        rng = step_generator(cfg.seed, step)
        for group in opts["autoencoder"].param_groups:
            group["lr"] = cfg.lr_at(step)
        real = to_tensor(data[torch.randint(0, data.shape[0], (cfg.batch,), generator=rng)].numpy()).to(device)
        g.train()
        e.train()
        loss, parts = _losses(e, g, real, cfg, rng)
        opts["autoencoder"].zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opts["autoencoder"].step()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            record = {"step": done, **parts}
            log.write(record)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or done == until:
            _checkpoint(out, g, e, opts, cfg, done, data_description, log, images)
        if done == until:
            break
    return record


def _checkpoint(out: Path, g: Generator, e: Encoder, opts: Mapping[str, torch.optim.Optimizer],
                cfg: AutoencoderTraining, step: int, data_description: str, log: MetricsLog,
                images: np.ndarray) -> None:
    g.eval()
    e.eval()
    generator_state = {"kind": "generator", "method": "autoencoder", "step": step, "config": cfg.to_dict(),
                       "data": data_description}
    save_checkpoint(out / "generator", {"generator": g}, generator_state)
    sample = images[np.random.default_rng(cfg.seed).permutation(images.shape[0])[:500]]
    errors = reconstruction_errors(e, g, sample)
    encoder_state = {"kind": "encoder", "method": "autoencoder", "step": step, "config": cfg.to_dict(),
                     "architecture": cfg.architecture.to_dict(), "generator": str(out / "generator"),
                     "reconstruction_error": percentiles(errors), "reconstruction_mae": float(errors.mean())}
    save_checkpoint(out / "encoder", {"encoder": e}, encoder_state, opts)
    plot_losses(log.read(), ["l1", "ssim"], out / "losses.png", "autoencoder")
    save_sample_grid(g, out / "generator" / "samples.png")
    with torch.no_grad():
        x = to_tensor(sample[:8]).to(next(e.parameters()).device)
        recon = g(e(x)).cpu().squeeze(1).numpy()
    write_grid([x.cpu().squeeze(1).numpy(), recon], out / "reconstructions.png", per_row=4)
    logger.info("autoencoder step %d: held-in MAE %.4f", step, float(errors.mean()))
