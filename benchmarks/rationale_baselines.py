"""The explainers GVR is compared with, all in the common call shape ``images -> maps``.

captum's Saliency, IntegratedGradients, Occlusion and LayerGradCam see the
composed model ``x -> logit f(E(x))``; Latent Shift (Cohen et al. 2021) moves the
latent along the classifier's gradient, ``z_lambda = z0 - lambda * grad f(z0)``,
and takes ``G(z0) - G(z_lambda)`` at the first lambda whose probability is below
the target. PyPI's ``latentshift`` needs torchvision (which this project never
installs), so the method is implemented here, on our encoder, generator and
classifier. Every map is ``N x R x R``; positive means "speaks for disease".
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from inference.bundle import Bundle
from inference.rationale import Explainer, RationaleConfig, explain

LATENT_SHIFT_LAMBDAS = 64


class ComposedModel(nn.Module):
    """``x -> logit f(E(x))`` as one module, for the captum attributions."""

    def __init__(self, bundle: Bundle) -> None:
        super().__init__()
        self.encoder, self.classifier = bundle.encoder, bundle.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.encoder(x))
        return logits.unsqueeze(1)


def _captum(method: Callable[[torch.Tensor], torch.Tensor]) -> Explainer:
    def explain(images: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            maps = method(images.clone().requires_grad_(True))
        return maps.detach()[:, 0]

    return explain


def captum_explainers(bundle: Bundle) -> dict[str, Explainer]:
    """Saliency, IntegratedGradients (black baseline), Occlusion (R/8 patches) and LayerGradCam."""
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion, Saliency

    model = ComposedModel(bundle).eval()
    r = bundle.manifest.resolution
    last_conv = [m for m in bundle.encoder.body if isinstance(m, nn.Conv2d)][-1]
    saliency, ig, occlusion = Saliency(model), IntegratedGradients(model), Occlusion(model)
    gradcam = LayerGradCam(model, last_conv)
    patch, stride = max(2, r // 8), max(1, r // 16)

    def grad_cam(x: torch.Tensor) -> torch.Tensor:
        coarse = gradcam.attribute(x, target=0, relu_attributions=True)
        fine: torch.Tensor = LayerAttribution.interpolate(coarse, (r, r), interpolate_mode="bilinear")
        return fine

    return {
        "Saliency": _captum(lambda x: saliency.attribute(x, target=0, abs=True)),
        "IntegratedGradients": _captum(lambda x: ig.attribute(x, baselines=-1.0, target=0, n_steps=32,
                                                              internal_batch_size=64)),
        "Occlusion": _captum(lambda x: occlusion.attribute(x, sliding_window_shapes=(1, patch, patch),
                                                           strides=(1, stride, stride), baselines=-1.0,
                                                           target=0, perturbations_per_eval=64)),
        "LayerGradCam": _captum(grad_cam),
    }


class LatentShiftExplainer:
    """Latent Shift: one gradient direction in latent space, searched along lambda."""

    def __init__(self, bundle: Bundle, target: float | None = None, max_lambda: float = 6.0) -> None:
        self.bundle = bundle
        self.target = target if target is not None else bundle.manifest.decision_threshold / 2
        self.lambdas = torch.linspace(0.0, max_lambda, LATENT_SHIFT_LAMBDAS)
        self.p_star: list[np.ndarray] = []  # per call, for the validity metric

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        b = self.bundle
        with torch.no_grad():
            z0 = b.encoder.encode(images)
        with torch.enable_grad():
            z = z0.clone().requires_grad_(True)
            grad = torch.autograd.grad(b.classifier.logits(z).sum(), z)[0]
        direction = grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
        with torch.no_grad():
            shifted = z0[:, None, :] - self.lambdas[None, :, None] * direction[:, None, :]  # N x L x d
            p = b.classifier.predict_proba(shifted.flatten(0, 1)).view(len(z0), -1)
            below = p < self.target
            first = torch.where(below.any(1), below.float().argmax(1), torch.full_like(below[:, 0], -1,
                                                                                         dtype=torch.long))
            first[first < 0] = len(self.lambdas) - 1
            chosen = shifted[torch.arange(len(z0)), first]
            self.p_star.append(p[torch.arange(len(z0)), first].numpy())
            maps: torch.Tensor = (b.generator.decode(z0) - b.generator.decode(chosen))[:, 0]
        return maps


class RecordingGVR:
    """GVR in the common call shape, keeping each batch's p* and steps for the validity metric."""

    def __init__(self, bundle: Bundle, config: RationaleConfig) -> None:
        self.bundle, self.config = bundle, config
        self.p_star: list[np.ndarray] = []
        self.steps: list[np.ndarray] = []

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        result = explain(self.bundle, images, self.config)
        self.p_star.append(result.p_star)
        self.steps.append(result.steps)
        return torch.from_numpy(result.rationale)


def all_explainers(bundle: Bundle, config: RationaleConfig) -> dict[str, Explainer]:
    """GVR first, then Latent Shift and the captum baselines, in table order."""
    return {"GVR": RecordingGVR(bundle, config), "LatentShift": LatentShiftExplainer(bundle, config.target),
            **captum_explainers(bundle)}
