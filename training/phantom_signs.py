"""Heart-failure signs, their severities, the synthetic BNP, and the lung markings they change.

Phantoms v2: each sign is present or absent on its own draw, nudged by one
latent "heart-failure burden" per patient, so signs occur alone as well as
together (a big heart often comes with effusions, but an effusion alone, edema
without cardiomegaly, or cardiomegaly alone are all common). A present sign
has a severity drawn uniformly in [0.2, 1]; an effusion is on the patient's
right, left or both sides. BNP weighs every sign so that none decides the
label on its own:

    log10(BNP) = 1.48 + 0.80 c + 0.80 e + 0.75 d + 0.65 v + N(0, 0.15)

(c, e, d, v = cardiomegaly, effusion, edema, venous diversion severities in
[0, 1]). The label is BNP >= 100 ng/L, as in Seah et al. 2018. Any one sign
above about 0.7 is enough for a positive; two milder signs together are too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from training.phantom_anatomy import F32, Anatomy, Grid, Lung, Side, line_profile, soft

SIGNS = ("cardiomegaly", "effusion", "venous_diversion", "edema")
BNP_THRESHOLD = 100.0  # ng/L
BNP_INTERCEPT = 1.48
BNP_WEIGHTS = {"cardiomegaly": 0.80, "effusion": 0.80, "venous_diversion": 0.65, "edema": 0.75}
BNP_NOISE_SD = 0.15
# presence: P(sign) = sigmoid(base + BURDEN_LOAD * burden); severity when present ~ U(MIN_SEVERITY, 1)
_PRESENCE_BASE = {"cardiomegaly": -1.0, "effusion": -1.1, "venous_diversion": -1.2, "edema": -1.1}
_BURDEN_LOAD = 0.9
MIN_SEVERITY = 0.2
HAZE_REACH = 1.1  # perihilar haze ends this many hilar radii out
NORMAL_CTR = (0.44, 0.03, 0.38, 0.485)  # mean, sd, clip low, clip high


@dataclass(frozen=True)
class SignState:
    """What a phantom has: severities per sign, which sides effuse, the drawn CTR and BNP.

    ``base_ctr`` is the patient's own normal heart size: the CTR of the healthy twin.
    """

    severities: dict[str, float]
    effusion_sides: tuple[float, float]  # severity on image left (patient right), image right
    ctr: float
    bnp: float
    base_ctr: float

    def __post_init__(self) -> None:
        if set(self.severities) != set(SIGNS):
            raise ValueError(f"severities must name exactly {SIGNS}, got {sorted(self.severities)}")
        for name, value in self.severities.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"severity of {name} must be in [0, 1], got {value}")

    def healthy(self) -> SignState:
        """The same patient with every sign removed (BNP: the noise-free value of no signs)."""
        return replace(self, severities={name: 0.0 for name in SIGNS}, effusion_sides=(0.0, 0.0),
                       ctr=self.base_ctr, bnp=float(10.0**BNP_INTERCEPT))


def noise_free_log_bnp(severities: dict[str, float]) -> float:
    """The part of log10(BNP) a perfect reader of the severities could know (no noise term)."""
    return BNP_INTERCEPT + sum(BNP_WEIGHTS[name] * severities[name] for name in SIGNS)


def _effusion_sides(rng: np.random.Generator, effusion: float) -> tuple[float, float]:
    """Both sides (35%), the patient's right only (35%) or left only (30%)."""
    which, other = rng.random(), effusion * rng.uniform(0.4, 1.0)
    if which < 0.35:
        return (effusion, other) if rng.random() < 0.5 else (other, effusion)
    return (effusion, 0.0) if which < 0.70 else (0.0, effusion)


def draw_signs(rng: np.random.Generator) -> SignState:
    """Draw the burden, each sign's presence and severity, the CTR, the effusion sides and a noisy BNP."""
    burden = rng.standard_normal()
    severities = {}
    for name in SIGNS:
        present = rng.random() < 1.0 / (1.0 + math.exp(-(_PRESENCE_BASE[name] + _BURDEN_LOAD * burden)))
        severity = rng.uniform(MIN_SEVERITY, 1.0)
        severities[name] = float(severity) if present else 0.0
    mean, sd, low, high = NORMAL_CTR
    base_ctr = float(np.clip(mean + sd * rng.standard_normal(), low, high))
    cardio = severities["cardiomegaly"]
    ctr = max(base_ctr + 0.02, 0.50 + 0.15 * cardio) if cardio > 0 else base_ctr
    sides = _effusion_sides(rng, severities["effusion"])
    log_bnp = noise_free_log_bnp(severities) + BNP_NOISE_SD * rng.standard_normal()
    return SignState(severities=severities, effusion_sides=sides, ctr=ctr, bnp=float(10.0**log_bnp),
                     base_ctr=base_ctr)


def effusion_fluid(grid: Grid, side: Side, lung: Lung, severity: float) -> np.ndarray:
    """Soft fluid fraction: fills the costophrenic angle under a meniscus that climbs the chest wall."""
    if severity <= 0:
        return np.zeros_like(grid.u)
    lateral_height = 0.06 + 0.48 * severity
    medial_height = 0.75 * lateral_height - 0.11
    span = np.maximum(lung.lateral_border - lung.medial_border, F32(0.05))
    rel = np.clip((lung.lateral - lung.medial_border) / span, 0.0, 1.0)
    surface = F32(side.cp_v - medial_height) - F32(lateral_height - medial_height) * rel * rel
    inside = (lung.lateral > lung.medial_border - F32(0.02)) & (
        lung.lateral_border + F32(0.03) > lung.lateral
    )
    return soft(grid.v - surface, grid.edge(0.03)) * inside


def kerley_lines(grid: Grid, side: Side, lung: Lung, severity: float, seed: int) -> np.ndarray:
    """Kerley B lines: short horizontal septal lines running in from the pleura at the lateral bases."""
    rng = np.random.default_rng([seed, 7, side.sign + 1])
    spacing = 0.035
    lengths = rng.uniform(0.03, 0.09, 64).astype(F32)
    jitter = rng.uniform(-0.25, 0.25, 64).astype(F32) * F32(spacing)
    present = (rng.random(64) < 0.35 + 0.6 * severity).astype(F32)
    q = (F32(side.cp_v) - grid.v) * F32(1.0 / spacing)
    index = np.clip(np.floor(q), 0, 63).astype(np.intp)
    offset = (q - index - F32(0.5)) * F32(spacing) - jitter[index]
    line = line_profile(offset, 0.003, grid.px) * present[index]
    line *= soft(lengths[index] - lung.to_lateral, grid.edge(0.01))
    zone = soft(q, 0.5) * soft(F32(0.38 / spacing) - q, 2.0)
    return np.asarray(line * zone * lung.field, dtype=F32)


def edema_mask(grid: Grid, side: Side, lung: Lung) -> np.ndarray:
    """Where edema shows: the lateral bases (Kerley lines) and the perihilar lung (haze), soft edges included."""
    in_lung = lung.field > 0
    bases = (lung.to_lateral < 0.12) & (grid.v > side.cp_v - 0.43)
    return in_lung & (bases | (_hilar_distance(grid, side) < HAZE_REACH))


def _hilar_distance(grid: Grid, side: Side) -> np.ndarray:
    du = (grid.u - F32(side.hilum[0])) * F32(1.0 / 0.30)
    dv = (grid.v - F32(side.hilum[1])) * F32(1.0 / 0.34)
    return np.asarray(np.sqrt(np.square(du) + np.square(dv)), dtype=F32)


def perihilar_haze(grid: Grid, side: Side, lung: Lung) -> np.ndarray:
    """Bat-wing haze of alveolar/interstitial fluid, densest at the hilum."""
    distance = _hilar_distance(grid, side)
    # the tail is cut at HAZE_REACH so the haze (and the twin's difference) stays inside the edema mask
    fade = np.clip((F32(HAZE_REACH) - distance) * F32(4.0), 0.0, 1.0)
    return np.asarray(np.exp(-np.square(distance) * F32(1.6)) * fade * lung.field, dtype=F32)


def upper_zone_mask(grid: Grid, side: Side, lung: Lung) -> np.ndarray:
    """Upper zones: lung above the hilum, where diverted (upward) veins run, soft lung edges included."""
    return (lung.field > 0) & (grid.v < side.hilum[1] + 0.02)


def vessels(grid: Grid, anatomy: Anatomy, side: Side, diversion: float) -> np.ndarray:
    """Pulmonary vessels fanning out of the hilum; venous diversion widens and brightens the upper ones.

    Each pixel looks at the nearest vessel of each generation by angle (a lookup
    table), so the cost does not grow with the number of vessels.
    """
    table = anatomy.vessels[0 if side.sign < 0 else 1]
    bins = 1024
    centres = (np.arange(bins) + 0.5) * (2 * math.pi / bins) - math.pi
    out = np.zeros_like(grid.u)
    for generation in np.unique(table[:, 7]):
        # later generations fan out of points further out, so the tree does not look like a starburst
        du = (grid.u - F32(side.hilum[0])) * F32(side.sign) - F32(0.05 * generation)
        dv = grid.v - F32(side.hilum[1])
        r = np.sqrt(np.square(du) + np.square(dv))
        phi = np.arctan2(dv, du)
        slot = np.clip(((phi + F32(math.pi)) * F32(bins / (2 * math.pi))).astype(np.intp), 0, bins - 1)
        angle, length, width, start, amp, freq, phase = (
            table[table[:, 7] == generation, i] for i in range(7)
        )
        upper = angle < -0.55
        gain = np.where(upper, 0.65 + 0.75 * diversion, 1.0).astype(F32)
        width = width * np.where(upper, 0.8 + 0.45 * diversion, 1.0).astype(F32)
        nearest = np.abs(centres[:, None] - angle[None, :]).argmin(axis=1)[slot]
        wiggle = amp[nearest] * np.sin(freq[nearest] * r + phase[nearest]) * np.clip(r * F32(4.0), 0.0, 1.0)
        offset = r * (phi - angle[nearest] - wiggle)
        taper = np.clip(F32(1.0) - r / length[nearest], 0.0, 1.0) * soft(r - start[nearest], 0.03)
        half = width[nearest] * (F32(0.25) + F32(0.75) * taper) * (taper > 0)
        eff = np.maximum(half, F32(0.75 * grid.px))
        thickness = np.sqrt(np.clip(F32(1.0) - np.square(offset / eff), 0.0, 1.0)) * (np.square(half) / eff)
        out += thickness * gain[nearest] * F32((0.55 + 0.35 * generation) / 0.011)
    return out


def parenchyma(rng: np.random.Generator, texels: int = 144) -> np.ndarray:
    """Unit-variance mottling on a fixed texel grid over anatomy space (so every size sees the same texture)."""
    noise = rng.standard_normal((texels, texels))
    freq = np.fft.fftfreq(texels)
    kernel = np.exp(-2.0 * (math.pi * 0.9) ** 2 * (freq[:, None] ** 2 + freq[None, :] ** 2))
    smooth = np.fft.ifft2(np.fft.fft2(noise) * kernel).real
    return np.asarray((smooth / smooth.std()), dtype=F32)


def sample_texture(texture: np.ndarray, grid: Grid, extent: float = 1.2) -> np.ndarray:
    """Bilinear lookup of ``texture`` (covering [-extent, extent]^2 of anatomy space) at the grid's pixels."""
    texels = texture.shape[0]
    scale = F32((texels - 1) / (2.0 * extent))
    x = np.clip((grid.u + F32(extent)) * scale, 0.0, texels - 1.001)
    y = np.clip((grid.v + F32(extent)) * scale, 0.0, texels - 1.001)
    x0, y0 = x.astype(np.intp), y.astype(np.intp)
    fx, fy = x - x0, y - y0
    top = texture[y0, x0] * (F32(1.0) - fx) + texture[y0, x0 + 1] * fx
    bottom = texture[y0 + 1, x0] * (F32(1.0) - fx) + texture[y0 + 1, x0 + 1] * fx
    return np.asarray(top * (F32(1.0) - fy) + bottom * fy, dtype=F32)
