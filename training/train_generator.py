"""WGAN-GP training of the generator on unlabelled images.

Follows the authors' recipe (Gulrajani et al.'s gradient penalty, weight 10,
``critic_steps`` critic updates per generator update, Adam). Every random draw
of a step (batch indices, latent noise, interpolation weights) comes from a
stream seeded by (seed, step), so ``--resume`` from a checkpoint reproduces
the uninterrupted run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from inference.models import ArchitectureConfig, Critic, Generator
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

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneratorTraining:
    """Hyper-parameters of one generator run (the architecture is part of it)."""

    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    steps: int = 5000
    batch: int = 64
    lr: float = 5e-5
    beta1: float = 0.5
    beta2: float = 0.9
    critic_steps: int = 2
    gp: float = 10.0
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 25

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "critic_steps", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"Adam betas must be in [0, 1), got ({self.beta1}, {self.beta2})")
        if self.gp < 0:
            raise ValueError(f"gp must be >= 0, got {self.gp!r}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["architecture"] = self.architecture.to_dict()
        return data


def gradient_penalty(critic: Critic, real: torch.Tensor, fake: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Mean of (||grad critic(x_hat)|| - 1)^2 on random interpolates of real and fake."""
    eps = torch.rand(real.shape[0], 1, 1, 1, generator=rng).to(real.device)
    mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
    scores = critic(mixed)
    (grads,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    penalty: torch.Tensor = ((grads.flatten(1).norm(dim=1) - 1.0) ** 2).mean()
    return penalty


def save_sample_grid(generator: Generator, path: Path, n: int = 16, seed: int = 1234) -> None:
    """A 4-per-row PNG of generator samples from fixed noise (watch training progress)."""
    z = torch.randn(n, generator.config.latent_dim, generator=torch.Generator().manual_seed(seed))
    device = next(generator.parameters()).device
    with torch.no_grad():
        images = generator(z.to(device)).cpu().squeeze(1).numpy()
    write_grid([images], path)


def write_grid(columns: list[np.ndarray], path: Path, per_row: int = 4) -> None:
    """Images from ``columns`` (each N x R x R in [-1, 1]) side by side, ``per_row`` items per row."""
    n, r = columns[0].shape[0], columns[0].shape[1]
    rows = (n + per_row - 1) // per_row
    width = len(columns) * r
    canvas = np.full((rows * (r + 2), per_row * (width + 4)), 255, dtype=np.uint8)
    for i in range(n):
        top, left = (i // per_row) * (r + 2), (i % per_row) * (width + 4)
        for c, images in enumerate(columns):
            tile = np.clip((images[i] + 1) * 127.5, 0, 255).astype(np.uint8)
            canvas[top:top + r, left + c * r:left + (c + 1) * r] = tile
    Image.fromarray(canvas).save(path)


def _critic_update(g: Generator, c: Critic, real: torch.Tensor, cfg: GeneratorTraining,
                   opt: torch.optim.Optimizer, rng: torch.Generator) -> tuple[float, float]:
    z = torch.randn(real.shape[0], cfg.architecture.latent_dim, generator=rng).to(real.device)
    with torch.no_grad():
        fake = g(z)
    distance = c(real).mean() - c(fake).mean()
    penalty = gradient_penalty(c, real, fake, rng)
    loss = -distance + cfg.gp * penalty
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(distance.detach()), float(penalty.detach())


def _generator_update(g: Generator, c: Critic, cfg: GeneratorTraining, opt: torch.optim.Optimizer,
                      rng: torch.Generator, device: torch.device) -> float:
    for p in c.parameters():
        p.requires_grad_(False)
    z = torch.randn(cfg.batch, cfg.architecture.latent_dim, generator=rng).to(device)
    loss = -c(g(z)).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    for p in c.parameters():
        p.requires_grad_(True)
    return float(loss)


def train_generator(images: np.ndarray, cfg: GeneratorTraining, out: Path, resume: bool = False,
                    device: torch.device | str = "cpu", data_description: str = "") -> dict[str, Any]:
    """Train (or continue) a WGAN-GP; checkpoints, metrics and plots go to ``out``.

    Returns the final record (step, losses).
    """
    device = torch.device(device)
    if images.shape[1:] != (cfg.architecture.resolution,) * 2:
        raise ValueError(f"images are {images.shape[1:]} but the resolution is {cfg.architecture.resolution}")
    torch.manual_seed(cfg.seed)
    g, c = Generator(cfg.architecture).to(device), Critic(cfg.architecture).to(device)
    opts = {"generator": torch.optim.Adam(g.parameters(), cfg.lr, betas=(cfg.beta1, cfg.beta2)),
            "critic": torch.optim.Adam(c.parameters(), cfg.lr, betas=(cfg.beta1, cfg.beta2))}
    start = 0
    if resume and (out / "state.json").exists():
        state = read_state(out)
        if ArchitectureConfig.from_dict(state["config"]["architecture"]) != cfg.architecture:
            raise ValueError(f"--resume: {out} holds another architecture: {state['config']['architecture']}")
        load_weights(g, out / "generator.safetensors", device)
        load_weights(c, out / "critic.safetensors", device)
        load_optimizers(out, opts)
        start = int(state["step"])
        logger.info("resuming generator training at step %d", start)
    log = MetricsLog(out / METRICS_FILE, resume=resume)
    log.truncate_after(start)
    data = torch.from_numpy(images)
    record: dict[str, Any] = {"step": start}
    for step in progress_bar(cfg.steps, start, "generator"):
        rng = step_generator(cfg.seed, step)
        for _ in range(cfg.critic_steps):
            idx = torch.randint(0, data.shape[0], (cfg.batch,), generator=rng)
            real = to_tensor(data[idx].numpy()).to(device)
            distance, penalty = _critic_update(g, c, real, cfg, opts["critic"], rng)
        g_loss = _generator_update(g, c, cfg, opts["generator"], rng, device)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            record = {"step": done, "wasserstein": distance, "gradient_penalty": penalty, "generator_loss": g_loss}
            log.write(record)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            _checkpoint(out, g, c, opts, cfg, done, data_description, log)
    return record


def _checkpoint(out: Path, g: Generator, c: Critic, opts: Mapping[str, torch.optim.Optimizer],
                cfg: GeneratorTraining, step: int, data_description: str, log: MetricsLog) -> None:
    state = {"kind": "generator", "step": step, "config": cfg.to_dict(), "data": data_description}
    save_checkpoint(out, {"generator": g, "critic": c}, state, opts)
    plot_losses(log.read(), ["wasserstein", "generator_loss"], out / "losses.png", "WGAN-GP")
    save_sample_grid(g, out / "samples.png")


def load_generator(folder: Path, device: torch.device | str = "cpu") -> Generator:
    """The generator of a training folder, in eval mode with frozen weights."""
    state = read_state(folder)
    if state.get("kind") != "generator":
        raise ValueError(f"{folder} is not a generator training folder (kind={state.get('kind')!r})")
    g = Generator(ArchitectureConfig.from_dict(state["config"]["architecture"])).to(device)
    load_weights(g, folder / "generator.safetensors", device)
    g.eval()
    for p in g.parameters():
        p.requires_grad_(False)
    return g
