"""Generative Visual Rationales (Seah et al. 2018): what the model needed to see disease.

The encoder puts an image ``x`` in the generator's latent space, ``z0 = E(x)``, and
the latent classifier scores it, ``p0 = f(z0)``. We then look for the nearest
"healthy" latent vector,

    z* = argmin_z  logit f(z) + lambda * d(G(z), G(z0))  [+ prior * |z|^2 / dim],

with Adam, stopping each image once its probability falls below a target. The
rationale is ``G(z0) - G(z*)``: the same chest decoded twice, with and without
what the classifier calls disease. The classifier term is the *logit*, not the
probability: a confident positive has a vanishing probability gradient, the logit
keeps pulling at the same rate.

One optimisation serves a whole batch. The loss is a *sum* over images and
Adam's update is element-wise, so each image's path is the same whether it runs
alone or in a batch; an image that reached the target is frozen (its latent
restored after every step), so the others may go on without moving it.

Every explainer, GVR and the baselines of the benchmarks alike, has one call
shape: ``explainer(images N x 1 x R x R) -> maps N x R x R`` (see ``Explainer``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import numpy as np
import torch

from inference.bundle import Bundle

logger = logging.getLogger(__name__)


class Distance(StrEnum):
    """The image-space distance that keeps ``G(z*)`` near ``G(z0)``: mean absolute or mean squared."""

    L1 = "l1"
    L2 = "l2"


class Explainer(Protocol):
    """The common call shape: model images ``N x 1 x R x R`` in [-1, 1] -> signed maps ``N x R x R``.

    A positive value marks a pixel that speaks *for* disease.
    """

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class RationaleConfig:
    """How the latent optimisation runs.

    ``target`` is the probability an image must fall below to stop; ``None`` takes
    half the bundle's decision threshold (a comfortably healthy counterfactual).
    ``weight`` is the paper's lambda; ``prior_weight`` adds ``|z|^2 / dim`` (the
    generator was trained on ``z ~ N(0, I)``), 0 turns it off. ``frames`` is the
    number of cine frames from ``G(z0)`` to ``G(z*)``, both ends included.
    """

    weight: float = 20.0
    distance: Distance = Distance.L1
    prior_weight: float = 0.0
    target: float | None = None
    lr: float = 0.05
    max_steps: int = 200
    frames: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "distance", Distance(self.distance))
        if not (self.weight >= 0 and np.isfinite(self.weight)):
            raise ValueError(f"weight (lambda) must be a finite number >= 0, got {self.weight!r}")
        if not (self.prior_weight >= 0 and np.isfinite(self.prior_weight)):
            raise ValueError(f"prior_weight must be a finite number >= 0, got {self.prior_weight!r}")
        if self.target is not None and not 0.0 < self.target < 1.0:
            raise ValueError(f"target must be a probability in (0, 1) or None, got {self.target!r}")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not isinstance(self.max_steps, int) or not 0 <= self.max_steps <= 100_000:
            raise ValueError(f"max_steps must be an int in [0, 100000], got {self.max_steps!r}")
        if not isinstance(self.frames, int) or not 2 <= self.frames <= 256:
            raise ValueError(f"frames must be an int in [2, 256] (first and last included), got {self.frames!r}")

    def target_for(self, decision_threshold: float) -> float:
        return self.target if self.target is not None else decision_threshold / 2


@dataclass(frozen=True)
class Rationale:
    """The result for a batch of ``N`` images; images are float32 in model space ([-1, 1]).

    ``rationale = reconstruction - healthy`` (signed, in [-2, 2]); ``frames`` is
    ``N x F x R x R`` from ``reconstruction`` to ``healthy``; ``ood_flag`` is
    ``ood_score`` above the bundle's 99th training percentile.
    """

    p0: np.ndarray
    p_star: np.ndarray
    reconstruction: np.ndarray
    healthy: np.ndarray
    rationale: np.ndarray
    steps: np.ndarray
    frames: np.ndarray
    ood_score: np.ndarray
    ood_flag: np.ndarray
    target: float

    def __post_init__(self) -> None:
        n = self.p0.shape[0]
        for name in ("p_star", "steps", "ood_score", "ood_flag"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"Rationale.{name} must have shape ({n},), got {getattr(self, name).shape}")
        for name in ("reconstruction", "healthy", "rationale"):
            array = getattr(self, name)
            if array.ndim != 3 or array.shape[0] != n:
                raise ValueError(f"Rationale.{name} must be {n} x R x R, got {array.shape}")
        if self.frames.ndim != 4 or self.frames.shape[0] != n:
            raise ValueError(f"Rationale.frames must be {n} x F x R x R, got {self.frames.shape}")

    def __len__(self) -> int:
        return int(self.p0.shape[0])


L1_SMOOTHING = 1e-3  # |d| is taken as sqrt(d^2 + eps^2) - eps: L1 everywhere but within eps of 0


def _distance(a: torch.Tensor, b: torch.Tensor, kind: Distance) -> torch.Tensor:
    """Mean per-pixel distance per image.

    L1 is smoothed at 0 (Charbonnier): at the first step ``G(z) = G(z0)`` and the
    subgradient of ``|d|`` would be the sign of float noise (a decode of a
    different batch size differs by ~1e-7), which makes the path of an image
    depend on its batch; the smooth form has a gradient of ~d / eps there instead.
    """
    diff = a - b
    if kind is Distance.L1:
        per_pixel = torch.sqrt(diff.square() + L1_SMOOTHING**2) - L1_SMOOTHING
    else:
        per_pixel = diff.square()
    return per_pixel.flatten(1).mean(dim=1)


def _pick_frames(history: list[torch.Tensor], steps: torch.Tensor, frames: int) -> torch.Tensor:
    """``N x F x d``: per image, F latents evenly spaced from step 0 to its own last step."""
    stacked = torch.stack(history, dim=1)  # N x (S+1) x d
    fractions = torch.linspace(0.0, 1.0, frames, device=steps.device)
    index = torch.round(fractions[None, :] * steps[:, None].to(fractions.dtype)).long()
    return torch.gather(stacked, 1, index[:, :, None].expand(-1, -1, stacked.shape[2]))


def optimise_latents(bundle: Bundle, z0: torch.Tensor, config: RationaleConfig
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the per-image-frozen Adam descent; returns (z*, steps N, cine latents N x F x d)."""
    target = config.target_for(bundle.manifest.decision_threshold)
    with torch.no_grad():
        reference = bundle.generator.decode(z0)
    z = z0.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([z], lr=config.lr)
    steps = torch.zeros(z0.shape[0], dtype=torch.long, device=z0.device)
    active = torch.ones(z0.shape[0], dtype=torch.bool, device=z0.device)
    history = [z0.detach().clone()]
    for step in range(config.max_steps + 1):
        logits = bundle.classifier.logits(z)
        active = active & (torch.sigmoid(logits.detach()) >= target)
        if step == config.max_steps or not bool(active.any()):
            break
        rows = active.nonzero().squeeze(1)  # only images still moving cost a decode
        z_rows = z[rows]
        loss = logits[rows]
        if config.weight > 0:
            loss = loss + config.weight * _distance(bundle.generator.decode(z_rows), reference[rows], config.distance)
        if config.prior_weight > 0:
            loss = loss + config.prior_weight * z_rows.square().mean(dim=1)
        optimiser.zero_grad(set_to_none=True)
        loss.sum().backward()  # type: ignore[no-untyped-call]
        before = z.detach().clone()
        optimiser.step()
        with torch.no_grad():
            z[~active] = before[~active]
        steps += active.long()
        history.append(z.detach().clone())
    return z.detach(), steps, _pick_frames(history, steps, config.frames)


def explain(bundle: Bundle, images: torch.Tensor, config: RationaleConfig | None = None) -> Rationale:
    """The rationale of each image of a batch ``N x 1 x R x R`` in [-1, 1] (on the bundle's device).

    Deterministic for a given config (its ``seed`` seeds torch's generator for the
    duration, so a stochastic layer could not make two runs differ).

    Raises:
        ValueError / TypeError: images of the wrong shape or dtype (from the models' guards).
    """
    config = config or RationaleConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        with torch.no_grad():
            z0 = bundle.encoder.encode(images)
            reconstruction = bundle.generator.decode(z0)
            p0 = bundle.classifier.predict_proba(z0)
            ood = (images - reconstruction).abs().flatten(1).mean(dim=1)
        with torch.enable_grad():
            z_star, steps, cine_latents = optimise_latents(bundle, z0, config)
        with torch.no_grad():
            healthy = bundle.generator.decode(z_star)
            p_star = bundle.classifier.predict_proba(z_star)
            n, f, d = cine_latents.shape
            cine = bundle.generator.decode(cine_latents.reshape(n * f, d)).reshape(n, f, *healthy.shape[2:])
    p99 = bundle.manifest.reconstruction_error["p99"]
    recon_np, healthy_np = _numpy(reconstruction[:, 0]), _numpy(healthy[:, 0])
    result = Rationale(
        p0=_numpy(p0), p_star=_numpy(p_star), reconstruction=recon_np, healthy=healthy_np,
        rationale=recon_np - healthy_np, steps=steps.cpu().numpy().astype(np.int64), frames=_numpy(cine),
        ood_score=_numpy(ood), ood_flag=_numpy(ood) > p99, target=config.target_for(
            bundle.manifest.decision_threshold),
    )
    logger.debug("rationale batch of %d: mean steps %.1f", len(result), float(result.steps.mean()))
    return result


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(np.float32)


class GVRExplainer:
    """GVR in the common ``Explainer`` call shape: images -> ``G(z0) - G(z*)``."""

    def __init__(self, bundle: Bundle, config: RationaleConfig | None = None) -> None:
        self.bundle = bundle
        self.config = config or RationaleConfig()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(explain(self.bundle, images, self.config).rationale)
