"""The four networks of the Generative Visual Rationale method.

A generator learns what chest radiographs look like from unlabelled images and an
``Encoder`` maps an image back into the generator's latent space: either a WGAN-GP
(``Generator`` + ``Critic``, then an encoder that inverts it) or, for the demo
bundle, both trained together as an autoencoder. A ``LatentClassifier`` predicts
heart failure from the latent vector.
Rationales (a later stage) optimise the latent vector against the classifier
while decoding it with the generator, so every model exposes an explicit verb
(``decode``, ``encode``, ``predict_proba``) with a guard that names the shape it
expected and the one it got: a silent broadcast there yields a wrong picture,
not an error.

Images in model space are float tensors ``N x 1 x R x R`` in ``[-1, 1]``.
The generator uses no batch normalisation, so ``decode`` of one latent vector
gives the same image in training and evaluation mode, whatever the batch.

Two generator bodies: ``upsample`` (nearest-neighbour resize then a 3x3
convolution per scale: no checkerboard, the default) and ``transposed`` (the
DCGAN body of the authors' code, kept so older bundles still load).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum
from itertools import pairwise
from typing import Any

import torch
from torch import nn

SUPPORTED_RESOLUTIONS = (32, 64, 128, 256)
GENERATOR_BODIES = ("upsample", "transposed")


@dataclass(frozen=True)
class ArchitectureConfig:
    """Sizes shared by the generator, critic and encoder of one bundle.

    ``generator_channels`` etc. are the width of the *highest-resolution* layer;
    each halving of the resolution doubles the width, capped at ``max_channels``.
    """

    resolution: int = 64
    latent_dim: int = 100
    generator_channels: int = 32
    critic_channels: int = 32
    encoder_channels: int = 32
    max_channels: int = 256
    generator_body: str = "upsample"

    def __post_init__(self) -> None:
        if self.generator_body not in GENERATOR_BODIES:
            raise ValueError(f"generator_body must be one of {GENERATOR_BODIES}, got {self.generator_body!r}")
        if self.resolution not in SUPPORTED_RESOLUTIONS:
            raise ValueError(
                f"resolution must be one of {SUPPORTED_RESOLUTIONS}, got {self.resolution!r}"
            )
        if not 2 <= self.latent_dim <= 4096:
            raise ValueError(f"latent_dim must be in [2, 4096], got {self.latent_dim!r}")
        for name in ("generator_channels", "critic_channels", "encoder_channels", "max_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 4 <= value <= 2048:
                raise ValueError(f"{name} must be an int in [4, 2048], got {value!r}")

    @property
    def n_scales(self) -> int:
        """Number of factor-2 resolution changes between 4x4 and ``resolution``."""
        return int(math.log2(self.resolution)) - 2

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchitectureConfig:
        known: dict[str, Any] = {k: int(v) for k, v in data.items()
                                 if k in cls.__dataclass_fields__ and k != "generator_body"}
        # a manifest written before the upsampling body existed describes the transposed one
        return cls(**known, generator_body=str(data.get("generator_body", "transposed")))


def _widths(base: int, n_scales: int, cap: int) -> list[int]:
    """Widths from the 4x4 layer (index 0) up to the full-resolution layer."""
    return [min(base * 2 ** (n_scales - 1 - i), cap) for i in range(n_scales)]


def _check_images(x: torch.Tensor, resolution: int, what: str) -> None:
    expected = f"a float tensor N x 1 x {resolution} x {resolution}"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} expects {expected}, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 1 or x.shape[2] != resolution or x.shape[3] != resolution:
        raise ValueError(f"{what} expects {expected}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{what} expects {expected}, got dtype {x.dtype}")


def _check_latents(z: torch.Tensor, latent_dim: int, what: str) -> None:
    expected = f"a float tensor N x {latent_dim}"
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{what} expects {expected}, got {type(z).__name__}")
    if z.dim() != 2 or z.shape[1] != latent_dim:
        raise ValueError(f"{what} expects {expected}, got shape {tuple(z.shape)}")
    if not z.is_floating_point():
        raise ValueError(f"{what} expects {expected}, got dtype {z.dtype}")


def _transposed_body(widths: list[int]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for c_in, c_out in pairwise(widths):
        layers += [nn.ReLU(inplace=True), nn.ConvTranspose2d(c_in, c_out, 4, 2, 1)]
    return [*layers, nn.ReLU(inplace=True), nn.ConvTranspose2d(widths[-1], 1, 4, 2, 1), nn.Tanh()]


def _upsample_body(widths: list[int]) -> list[nn.Module]:
    """Resize + 3x3 convolution per scale: every output pixel sees the same kernel, so no checkerboard."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip([widths[0], *widths[:-1]], widths, strict=True):
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, 1, 1),
                   nn.LeakyReLU(0.2, inplace=True)]
    return [*layers, nn.Conv2d(widths[-1], 1, 3, 1, 1), nn.Tanh()]


class Generator(nn.Module):
    """Decoder: latent ``N x d`` -> image ``N x 1 x R x R`` in [-1, 1], from a 4 x 4 projection up."""

    def __init__(self, config: ArchitectureConfig) -> None:
        super().__init__()
        self.config = config
        widths = _widths(config.generator_channels, config.n_scales, config.max_channels)
        self.project = nn.Linear(config.latent_dim, widths[0] * 16)
        body = _upsample_body(widths) if config.generator_body == "upsample" else _transposed_body(widths)
        self.body = nn.Sequential(*body)
        self._first_width = widths[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(z.shape[0], self._first_width, 4, 4)
        images: torch.Tensor = self.body(h)
        return images

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent vectors -> images; raises ValueError on a wrong shape."""
        _check_latents(z, self.config.latent_dim, "Generator.decode")
        return self.forward(z)


def _downsampler(config: ArchitectureConfig, base: int) -> tuple[nn.Sequential, int]:
    widths = list(reversed(_widths(base, config.n_scales, config.max_channels)))
    layers: list[nn.Module] = [nn.Conv2d(1, widths[0], 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
    for c_in, c_out in pairwise(widths):
        layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
    return nn.Sequential(*layers, nn.Flatten()), widths[-1] * 16


class Critic(nn.Module):
    """WGAN critic: no batch normalisation (the gradient penalty is per sample)."""

    def __init__(self, config: ArchitectureConfig) -> None:
        super().__init__()
        self.config = config
        self.body, features = _downsampler(config, config.critic_channels)
        self.score = nn.Linear(features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores: torch.Tensor = self.score(self.body(x)).squeeze(1)
        return scores

    def criticise(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> one unbounded realness score per image."""
        _check_images(x, self.config.resolution, "Critic.criticise")
        return self.forward(x)


class Encoder(nn.Module):
    """Inverts the generator: image ``N x 1 x R x R`` -> latent ``N x d``."""

    def __init__(self, config: ArchitectureConfig) -> None:
        super().__init__()
        self.config = config
        self.body, features = _downsampler(config, config.encoder_channels)
        self.head = nn.Linear(features, config.latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents: torch.Tensor = self.head(self.body(x))
        return latents

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> latent vectors; raises ValueError on a wrong shape."""
        _check_images(x, self.config.resolution, "Encoder.encode")
        return self.forward(x)


class ClassifierKind(str, Enum):
    LOGISTIC = "logistic"
    MLP = "mlp"


@dataclass(frozen=True)
class ClassifierConfig:
    """A logistic regression (one linear layer) or an MLP on standardised latents."""

    kind: ClassifierKind = ClassifierKind.LOGISTIC
    latent_dim: int = 100
    hidden: tuple[int, ...] = ()
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ClassifierKind(self.kind))
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim!r}")
        if self.kind is ClassifierKind.LOGISTIC and self.hidden:
            raise ValueError(f"a logistic classifier has no hidden layers, got hidden={self.hidden!r}")
        if self.kind is ClassifierKind.MLP and not self.hidden:
            raise ValueError("an mlp classifier needs at least one hidden width, e.g. hidden=(64,)")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden widths must be >= 1, got {self.hidden!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "latent_dim": self.latent_dim,
                "hidden": list(self.hidden), "dropout": self.dropout}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierConfig:
        return cls(kind=data["kind"], latent_dim=int(data["latent_dim"]),
                   hidden=tuple(data.get("hidden", ())), dropout=float(data.get("dropout", 0.0)))


class LatentClassifier(nn.Module):
    """Predicts heart failure from a latent vector.

    The latent mean and scale of the training set are buffers, so the weights
    file alone reproduces the standardisation the model was trained with.
    """

    latent_mean: torch.Tensor
    latent_scale: torch.Tensor

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("latent_mean", torch.zeros(config.latent_dim))
        self.register_buffer("latent_scale", torch.ones(config.latent_dim))
        layers: list[nn.Module] = []
        width = config.latent_dim
        for hidden in config.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.body = nn.Sequential(*layers)

    @property
    def kind(self) -> ClassifierKind:
        return self.config.kind

    def set_standardisation(self, mean: torch.Tensor, scale: torch.Tensor) -> None:
        if mean.shape != (self.config.latent_dim,) or scale.shape != (self.config.latent_dim,):
            raise ValueError(
                f"standardisation expects two vectors of length {self.config.latent_dim}, "
                f"got {tuple(mean.shape)} and {tuple(scale.shape)}"
            )
        if bool((scale <= 0).any()):
            raise ValueError("standardisation scale must be positive everywhere")
        self.latent_mean.copy_(mean)
        self.latent_scale.copy_(scale)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.body((z - self.latent_mean) / self.latent_scale).squeeze(1)
        return logits

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Latent vectors ``N x d`` -> disease logits ``N``."""
        _check_latents(z, self.config.latent_dim, "LatentClassifier.logits")
        return self.forward(z)

    def predict_proba(self, z: torch.Tensor) -> torch.Tensor:
        """Latent vectors ``N x d`` -> probability of heart failure ``N`` in [0, 1]."""
        return torch.sigmoid(self.logits(z))
