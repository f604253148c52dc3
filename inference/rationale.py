"""Generative Visual Rationales (Seah et al. 2018): what the model needed to see disease.

The encoder puts an image ``x`` in the generator's latent space, ``z0 = E(x)``, and
the latent classifier scores it, ``p0 = f(z0)``. We then look for the nearest
"healthy" latent vector,

    z* = argmin_z  T * softplus((logit f(z) - logit(target)) / T)
                   + lambda * d(G(z), G(z0))
                   + mu * mean(((z - z0) / s)^2)
                   + prior * mean(((z - m) / s)^2),

with Adam, run to convergence. The classifier term is bounded below: it pulls
like the logit while the image is still called diseased and fades once the
probability is under ``target`` (within about ``T`` logits), so it cannot run
away to -infinity; from there on the other terms decide where ``z*`` settles.
``lambda`` keeps the decoded image near ``G(z0)``; ``mu`` is a Gaussian latent
prior centred on the image's own encoding, in units of the training latents'
spread ``s``: without it, the optimum is an almost invisible move along
latent directions the decoder barely draws but the classifier still reads
(an adversarial example in latent space, measured: fidelity to the true
disease fell from 0.75 on the way to 0.19 at convergence); ``prior`` (off by
default) pulls towards the training latents' mean ``m``. The rationale is
``G(z0) - G(z*)``: the same chest decoded twice, with and without what the
classifier calls disease; the healthy image a reader sees is the patient's own
image minus it, ``x - (G(z0) - G(z*))``.

Convergence, per image: the objective improved by less than ``tolerance`` over
the last ``patience`` steps (or ``max_steps`` was reached); ``converged`` says
which. Each image keeps the best latent it visited, so the objective at ``z*``
never exceeds the one at ``z0``; an image already under ``target`` is not
optimised at all (nothing to remove: ``z* = z0``). One optimisation serves a whole batch. The loss is a *sum* over images
and Adam's update is element-wise, so each image's path is the same whether it
runs alone or in a batch; a converged image is frozen (its latent restored after
every step), so the others may go on without moving it.

Every explainer, GVR and the baselines of the benchmarks alike, has one call
shape: ``explainer(images N x 1 x R x R) -> maps N x R x R`` (see ``Explainer``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

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

    ``target`` is the probability under which the classifier term lets go; ``None``
    takes half the bundle's decision threshold (a comfortably healthy
    counterfactual); ``temperature`` is how softly it lets go (in logits).
    ``weight`` is the paper's lambda (per mean-pixel distance in model units);
    ``proximity_weight`` weighs the latent prior centred on ``z0``,
    ``prior_weight`` the one centred on the training mean; 0 turns either off.
    ``tolerance`` and ``patience`` are the convergence criterion (objective
    improvement over the last ``patience`` steps); ``max_steps`` caps the run.
    ``frames`` is the number of cine frames from ``G(z0)`` to ``G(z*)``, both
    ends included. ``noise_floor`` (model units) is shrunk off every pixel of
    ``G(z0) - G(z*)``, ``sign(d) max(|d| - floor, 0)``: the autoencoder cannot draw
    an image closer than its own reconstruction error, so a change that small is
    not evidence. ``None`` takes the bundle's median reconstruction error
    (``manifest.reconstruction_error.p50``); 0 turns it off.
    """

    # chosen on validation phantoms (docs/rationale.md, configuration sweep): the population prior
    # with a larger lambda removes more of each sign and less of the anatomy than the defaults before
    weight: float = 30.0
    distance: Distance = Distance.L1
    proximity_weight: float = 0.5
    prior_weight: float = 1.0
    temperature: float = 1.0
    target: float | None = None
    lr: float = 0.05
    max_steps: int = 150
    tolerance: float = 1e-3
    patience: int = 10
    frames: int = 8
    seed: int = 0
    noise_floor: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "distance", Distance(self.distance))
        if not (self.weight >= 0 and np.isfinite(self.weight)):
            raise ValueError(f"weight (lambda) must be a finite number >= 0, got {self.weight!r}")
        for name in ("prior_weight", "proximity_weight"):
            value = getattr(self, name)
            if not (value >= 0 and np.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (self.temperature > 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.target is not None and not 0.0 < self.target < 1.0:
            raise ValueError(f"target must be a probability in (0, 1) or None, got {self.target!r}")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not isinstance(self.max_steps, int) or not 0 <= self.max_steps <= 100_000:
            raise ValueError(f"max_steps must be an int in [0, 100000], got {self.max_steps!r}")
        if not (self.tolerance >= 0 and np.isfinite(self.tolerance)):
            raise ValueError(f"tolerance must be a finite number >= 0, got {self.tolerance!r}")
        if not isinstance(self.patience, int) or not 1 <= self.patience <= 10_000:
            raise ValueError(f"patience must be an int in [1, 10000], got {self.patience!r}")
        if self.noise_floor is not None and not (0 <= self.noise_floor < 1 and np.isfinite(self.noise_floor)):
            raise ValueError(f"noise_floor must be in [0, 1) model units or None, got {self.noise_floor!r}")
        if not isinstance(self.frames, int) or not 2 <= self.frames <= 256:
            raise ValueError(f"frames must be an int in [2, 256] (first and last included), got {self.frames!r}")

    def target_for(self, decision_threshold: float) -> float:
        return self.target if self.target is not None else decision_threshold / 2

    def floor_for(self, reconstruction_error: dict[str, float]) -> float:
        return self.noise_floor if self.noise_floor is not None else float(reconstruction_error["p50"])


@dataclass(frozen=True)
class Rationale:
    """The result for a batch of ``N`` images; images are float32 in model space ([-1, 1]).

    ``rationale = shrink(reconstruction - healthy)`` (signed, in [-2, 2]; positive
    speaks for disease; ``RationaleConfig.noise_floor`` shrunk off);
    ``counterfactual = clip(x - rationale)``, the patient's own image
    with the disease removed; ``frames`` is ``N x F x R x R`` from
    ``reconstruction`` to ``healthy``; ``ood_flag`` is ``ood_score`` above the
    bundle's 99th training percentile. ``objective_start``/``objective_end`` are
    the objective at ``z0`` and at ``z*``; ``converged`` is False for an image
    stopped by ``max_steps``.
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
    counterfactual: np.ndarray
    objective_start: np.ndarray
    objective_end: np.ndarray
    converged: np.ndarray

    def __post_init__(self) -> None:
        n = self.p0.shape[0]
        for name in ("p_star", "steps", "ood_score", "ood_flag", "objective_start", "objective_end", "converged"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"Rationale.{name} must have shape ({n},), got {getattr(self, name).shape}")
        for name in ("reconstruction", "healthy", "rationale", "counterfactual"):
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


@dataclass(frozen=True)
class _Objective:
    """The per-image objective of one bundle, config and batch of starting latents."""

    bundle: Bundle
    config: RationaleConfig
    reference: torch.Tensor  # G(z0)
    origin: torch.Tensor  # z0
    target_logit: float

    def __call__(self, z: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(objective per row, logit per row) for ``z`` (the rows' latents)."""
        config, classifier = self.config, self.bundle.classifier
        logits = classifier.logits(z)
        loss = F.softplus((logits - self.target_logit) / config.temperature) * config.temperature
        if config.weight > 0:
            decoded = self.bundle.generator.decode(z)
            loss = loss + config.weight * _distance(decoded, self.reference[rows], config.distance)
        if config.proximity_weight > 0:
            moved = (z - self.origin[rows]) / classifier.latent_scale
            loss = loss + config.proximity_weight * moved.square().mean(dim=1)
        if config.prior_weight > 0:
            standard = (z - classifier.latent_mean) / classifier.latent_scale
            loss = loss + config.prior_weight * standard.square().mean(dim=1)
        return loss, logits


def optimise_latents(bundle: Bundle, z0: torch.Tensor, config: RationaleConfig
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam to convergence per image; returns (z*, steps N, cine latents N x F x d, objective at z0 N,
    objective at z* N, converged N)."""
    target = config.target_for(bundle.manifest.decision_threshold)
    with torch.no_grad():
        reference = bundle.generator.decode(z0)
    objective = _Objective(bundle, config, reference, z0.detach(), math.log(target / (1 - target)))
    n = z0.shape[0]
    everyone = torch.arange(n, device=z0.device)
    with torch.no_grad():
        start_loss = objective(z0, everyone)[0]
    z = z0.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([z], lr=config.lr)
    steps = torch.zeros(n, dtype=torch.long, device=z0.device)
    with torch.no_grad():  # an image already under the target has nothing to remove: z* = z0, 0 steps
        active = bundle.classifier.predict_proba(z0) >= target
    converged = ~active
    losses = [start_loss.clone()]  # objective per image before each step (frozen images repeat theirs)
    history = [z0.detach().clone()]
    best_z, best_loss = z0.detach().clone(), start_loss.clone()
    for step in range(config.max_steps if bool(active.any()) else 0):
        rows = active.nonzero().squeeze(1)  # only images still moving cost a decode
        loss, _ = objective(z[rows], rows)
        optimiser.zero_grad(set_to_none=True)
        loss.sum().backward()  # type: ignore[no-untyped-call]
        before = z.detach().clone()
        optimiser.step()
        with torch.no_grad():
            z[~active] = before[~active]
            current = losses[-1].clone()
            current[rows] = loss.detach()
            losses[-1] = current
            losses.append(current.clone())
            # Adam's first steps have the size lr whatever the gradient: keep each image's best latent,
            # so z* is never worse than z0 (an image with nothing to remove stays where it is)
            better = current < best_loss
            best_loss = torch.where(better, current, best_loss)
            best_z[better] = before[better]
        steps += active.long()
        history.append(z.detach().clone())
        if step + 1 >= config.patience:
            done = (losses[-1 - config.patience] - current) < config.tolerance
            converged |= active & done
            active &= ~done
        if not bool(active.any()):
            break
    with torch.no_grad():
        last_loss = objective(z.detach(), everyone)[0]
        better = last_loss < best_loss
        best_loss = torch.where(better, last_loss, best_loss)
        best_z[better] = z.detach()[better]
    cine = _pick_frames(history, steps, config.frames)
    cine[:, -1] = best_z  # the cine ends on the healthy image itself
    return best_z, steps, cine, start_loss, best_loss, converged


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
            z_star, steps, cine_latents, start_loss, end_loss, converged = optimise_latents(bundle, z0, config)
        with torch.no_grad():
            healthy = bundle.generator.decode(z_star)
            p_star = bundle.classifier.predict_proba(z_star)
            n, f, d = cine_latents.shape
            cine = bundle.generator.decode(cine_latents.reshape(n * f, d)).reshape(n, f, *healthy.shape[2:])
    p99 = bundle.manifest.reconstruction_error["p99"]
    recon_np, healthy_np = _numpy(reconstruction[:, 0]), _numpy(healthy[:, 0])
    rationale = shrink(recon_np - healthy_np, config.floor_for(bundle.manifest.reconstruction_error))
    result = Rationale(
        p0=_numpy(p0), p_star=_numpy(p_star), reconstruction=recon_np, healthy=healthy_np,
        rationale=rationale, steps=steps.cpu().numpy().astype(np.int64), frames=_numpy(cine),
        ood_score=_numpy(ood), ood_flag=_numpy(ood) > p99, target=config.target_for(
            bundle.manifest.decision_threshold),
        counterfactual=np.clip(_numpy(images[:, 0]) - rationale, -1.0, 1.0),
        objective_start=_numpy(start_loss), objective_end=_numpy(end_loss),
        converged=converged.cpu().numpy(),
    )
    logger.debug("rationale batch of %d: mean steps %.1f", len(result), float(result.steps.mean()))
    return result


def shrink(difference: np.ndarray, floor: float) -> np.ndarray:
    """Soft threshold: ``sign(d) max(|d| - floor, 0)`` (continuous; 0 leaves ``d`` as it is)."""
    if floor <= 0:
        return difference
    out: np.ndarray = (np.sign(difference) * np.maximum(np.abs(difference) - floor, 0.0)).astype(np.float32)
    return out


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(np.float32)


class GVRExplainer:
    """GVR in the common ``Explainer`` call shape: images -> ``G(z0) - G(z*)``."""

    def __init__(self, bundle: Bundle, config: RationaleConfig | None = None) -> None:
        self.bundle = bundle
        self.config = config or RationaleConfig()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(explain(self.bundle, images, self.config).rationale)
