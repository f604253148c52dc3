"""Encoder training: invert a frozen generator.

Two losses, both reported: the latent loss ``mean (E(G(z)) - z)^2`` on sampled
``z`` (the encoder lands where the generator reads), and the image loss
``mean |G(E(x)) - x|`` on real images (the encoding keeps what the image shows;
raise ``image_weight`` if the latent carries too little disease signal). An
optional ``norm_weight`` pulls ``E(x)`` towards the prior's norm sqrt(d).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

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
from training.train_generator import write_grid

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderTraining:
    """Hyper-parameters of one encoder run; the width of the encoder is ``channels``."""

    steps: int = 2000
    batch: int = 64
    lr: float = 2e-4
    channels: int = 32
    latent_weight: float = 1.0
    image_weight: float = 1.0
    norm_weight: float = 0.0
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 25

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "channels", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        for name in ("latent_weight", "image_weight", "norm_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.latent_weight == 0 and self.image_weight == 0:
            raise ValueError("latent_weight and image_weight cannot both be 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reconstruction_errors(encoder: Encoder, generator: Generator, images: np.ndarray,
                          batch: int = 256) -> np.ndarray:
    """Per image ``mean |x - G(E(x))|`` in model space ([-1, 1]): the out-of-distribution score."""
    device = next(encoder.parameters()).device
    errors = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            x = to_tensor(images[i:i + batch]).to(device)
            errors.append((generator.decode(encoder.encode(x)) - x).abs().mean(dim=(1, 2, 3)).cpu())
    return torch.cat(errors).numpy().astype(np.float64)


def percentiles(errors: np.ndarray) -> dict[str, float]:
    return {f"p{q}": float(np.percentile(errors, q)) for q in (50, 95, 99)}


def _losses(e: Encoder, g: Generator, real: torch.Tensor, z: torch.Tensor,
            cfg: EncoderTraining) -> tuple[torch.Tensor, dict[str, float]]:
    with torch.no_grad():
        fake = g(z)
    latent_loss = ((e(fake) - z) ** 2).mean()
    codes = e(real)
    image_loss = (g(codes) - real).abs().mean()
    loss = cfg.latent_weight * latent_loss + cfg.image_weight * image_loss
    norm_loss = torch.zeros(())
    if cfg.norm_weight > 0:
        norm_loss = ((codes.norm(dim=1) - math.sqrt(codes.shape[1])) ** 2).mean() / codes.shape[1]
        loss = loss + cfg.norm_weight * norm_loss
    return loss, {"latent_loss": float(latent_loss), "image_loss": float(image_loss),
                  "norm_loss": float(norm_loss)}


def train_encoder(images: np.ndarray, generator: Generator, cfg: EncoderTraining, out: Path,
                  resume: bool = False, device: torch.device | str = "cpu",
                  generator_dir: str = "") -> dict[str, Any]:
    """Train (or continue) an encoder for the frozen ``generator``; returns the final record."""
    device = torch.device(device)
    arch = generator.config
    if images.shape[1:] != (arch.resolution,) * 2:
        raise ValueError(f"images are {images.shape[1:]} but the generator makes {arch.resolution} px")
    arch = dataclasses.replace(arch, encoder_channels=cfg.channels)
    generator = generator.to(device).eval()
    for p in generator.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    e = Encoder(arch).to(device)
    opts = {"encoder": torch.optim.Adam(e.parameters(), cfg.lr, betas=(0.5, 0.999))}
    start = 0
    if resume and (out / "state.json").exists():
        state = read_state(out)
        load_weights(e, out / "encoder.safetensors", device)
        load_optimizers(out, opts)
        start = int(state["step"])
        logger.info("resuming encoder training at step %d", start)
    log = MetricsLog(out / METRICS_FILE, resume=resume)
    log.truncate_after(start)
    data = torch.from_numpy(images)
    record: dict[str, Any] = {"step": start}
    for step in progress_bar(cfg.steps, start, "encoder"):
        rng = step_generator(cfg.seed, step)
        idx = torch.randint(0, data.shape[0], (cfg.batch,), generator=rng)
        real = to_tensor(data[idx].numpy()).to(device)
        z = torch.randn(cfg.batch, arch.latent_dim, generator=rng).to(device)
        e.train()
        loss, parts = _losses(e, generator, real, z, cfg)
        opts["encoder"].zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opts["encoder"].step()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            record = {"step": done, **parts}
            log.write(record)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            _checkpoint(out, e, generator, opts, cfg, arch, done, generator_dir, log, images)
    return record


def _checkpoint(out: Path, e: Encoder, g: Generator, opts: Mapping[str, torch.optim.Optimizer],
                cfg: EncoderTraining, arch: ArchitectureConfig, step: int, generator_dir: str,
                log: MetricsLog, images: np.ndarray) -> None:
    e.eval()
    sample = images[np.random.default_rng(cfg.seed).permutation(images.shape[0])[:1000]]
    errors = reconstruction_errors(e, g, sample)
    state = {"kind": "encoder", "step": step, "config": cfg.to_dict(), "architecture": arch.to_dict(),
             "generator": generator_dir, "reconstruction_error": percentiles(errors),
             "reconstruction_mae": float(errors.mean())}
    save_checkpoint(out, {"encoder": e}, state, opts)
    plot_losses(log.read(), ["latent_loss", "image_loss"], out / "losses.png", "encoder")
    with torch.no_grad():
        x = to_tensor(sample[:8]).to(next(e.parameters()).device)
        recon = g(e(x)).cpu().squeeze(1).numpy()
    write_grid([x.cpu().squeeze(1).numpy(), recon], out / "reconstructions.png", per_row=4)


def load_encoder(folder: Path, device: torch.device | str = "cpu") -> Encoder:
    """The encoder of a training folder, in eval mode."""
    state = read_state(folder)
    if state.get("kind") != "encoder":
        raise ValueError(f"{folder} is not an encoder training folder (kind={state.get('kind')!r})")
    e = Encoder(ArchitectureConfig.from_dict(state["architecture"])).to(device)
    load_weights(e, folder / "encoder.safetensors", device)
    return e.eval()
