"""A job's outcome in three fields, from ``Job.result``: finding, probability, out-of-distribution flag.

The worker records one entry per image (probability, positive, ood_flag); a
reviewer scanning ``gvr audit`` wants the study's answer. The probability is the
highest of the study's images; an image out of distribution gets no finding
(the SR says "not analysed" for it), so a study whose every image is out of
distribution has none either.
"""

from __future__ import annotations

from typing import Any

POSITIVE = "HF+"
NEGATIVE = "HF-"
NOT_ANALYSED = "not analysed (OOD)"


def job_outcome(result: dict[str, Any] | None) -> dict[str, Any]:
    """``{"finding", "probability", "ood"}``; all None while the job has no result."""
    images = [image for image in (result or {}).get("images") or [] if isinstance(image, dict)]
    if not images:
        return {"finding": None, "probability": None, "ood": None}
    analysed = [image for image in images if not image.get("ood_flag")]
    if not analysed:
        finding = NOT_ANALYSED
    else:
        finding = POSITIVE if any(image.get("positive") for image in analysed) else NEGATIVE
    probability = max(float(image.get("probability", 0.0)) for image in images)
    return {"finding": finding, "probability": round(probability, 3), "ood": len(analysed) < len(images)}
