"""Models: explicit verbs, shapes and the guards that name what was expected."""

from __future__ import annotations

import pytest
import torch

from inference.models import (
    ArchitectureConfig,
    ClassifierConfig,
    ClassifierKind,
    Critic,
    Encoder,
    Generator,
    LatentClassifier,
)


@pytest.fixture
def config() -> ArchitectureConfig:
    return ArchitectureConfig(resolution=32, latent_dim=16, generator_channels=8, critic_channels=8,
                              encoder_channels=8)


def test_generator_decode_returns_images_in_model_range(config: ArchitectureConfig) -> None:
    """decode: N x d -> N x 1 x R x R within [-1, 1]."""
    torch.manual_seed(0)
    images = Generator(config).decode(torch.randn(3, 16))
    assert images.shape == (3, 1, 32, 32)
    assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0


def test_generator_decode_is_independent_of_the_batch(config: ArchitectureConfig) -> None:
    """No batch normalisation: one latent decodes the same alone or in a batch."""
    torch.manual_seed(0)
    g = Generator(config).train()
    z = torch.randn(4, 16)
    torch.testing.assert_close(g.decode(z[:1]), g.decode(z)[:1])


def test_generator_decode_rejects_wrong_latent_size(config: ArchitectureConfig) -> None:
    """A 10-d latent for a 16-d generator: ValueError naming both shapes."""
    with pytest.raises(ValueError, match=r"N x 16, got shape \(2, 10\)"):
        Generator(config).decode(torch.randn(2, 10))


def test_encoder_encode_returns_latents(config: ArchitectureConfig) -> None:
    """encode: N x 1 x R x R -> N x d."""
    assert Encoder(config).encode(torch.zeros(5, 1, 32, 32)).shape == (5, 16)


def test_encoder_encode_rejects_wrong_resolution(config: ArchitectureConfig) -> None:
    """A 64 px image for a 32 px encoder: ValueError naming both shapes."""
    with pytest.raises(ValueError, match=r"N x 1 x 32 x 32, got shape \(1, 1, 64, 64\)"):
        Encoder(config).encode(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="got shape"):
        Encoder(config).encode(torch.zeros(1, 32, 32))


def test_critic_criticise_returns_one_score_per_image(config: ArchitectureConfig) -> None:
    """criticise: N images -> N scores; no batch-norm layer anywhere."""
    critic = Critic(config)
    assert critic.criticise(torch.zeros(4, 1, 32, 32)).shape == (4,)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in critic.modules())


@pytest.mark.parametrize("kind,hidden", [("logistic", ()), ("mlp", (8,))])
def test_latent_classifier_predict_proba_in_unit_interval(kind: str, hidden: tuple[int, ...]) -> None:
    """predict_proba: N x d -> N probabilities; logits agree."""
    torch.manual_seed(0)
    model = LatentClassifier(ClassifierConfig(kind, 16, hidden)).eval()
    z = torch.randn(6, 16) * 5
    p = model.predict_proba(z)
    assert p.shape == (6,) and float(p.min()) >= 0 and float(p.max()) <= 1
    torch.testing.assert_close(torch.sigmoid(model.logits(z)), p)
    assert model.kind is ClassifierKind(kind)


def test_latent_classifier_rejects_wrong_latent_size() -> None:
    """A 1-d vector instead of N x d: ValueError naming both shapes."""
    model = LatentClassifier(ClassifierConfig("logistic", 16))
    with pytest.raises(ValueError, match=r"N x 16, got shape \(16,\)"):
        model.predict_proba(torch.zeros(16))


def test_classifier_config_rejects_inconsistent_kind() -> None:
    """A logistic model with hidden layers, or an MLP without, is refused."""
    with pytest.raises(ValueError, match="no hidden layers"):
        ClassifierConfig("logistic", 16, (8,))
    with pytest.raises(ValueError, match="at least one hidden"):
        ClassifierConfig("mlp", 16)
    with pytest.raises(ValueError):
        ClassifierConfig("forest", 16)


def test_architecture_config_rejects_unsupported_resolution() -> None:
    """Resolution 100 is not a power of two the DCGAN supports."""
    with pytest.raises(ValueError, match=r"one of \(32, 64, 128, 256\), got 100"):
        ArchitectureConfig(resolution=100)


def test_models_build_at_128() -> None:
    """128 x 128 still works end to end (the paper's resolution)."""
    config = ArchitectureConfig(resolution=128, latent_dim=100, generator_channels=8, critic_channels=8,
                                encoder_channels=8)
    z = torch.randn(2, 100)
    images = Generator(config).decode(z)
    assert images.shape == (2, 1, 128, 128)
    assert Encoder(config).encode(images).shape == (2, 100)
    assert Critic(config).criticise(images).shape == (2,)
