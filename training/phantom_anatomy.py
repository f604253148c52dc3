"""Normal chest anatomy for the synthetic radiograph phantoms.

Everything is drawn in *anatomy coordinates*: ``u`` left to right and ``v``
top to bottom, both in [-1, 1] across the detector (one unit is about 20 cm),
image left being the patient's right as on a PA film. Shapes are analytic
functions of (u, v), so a phantom drawn at 128 or 1024 pixels is the same
patient; edges are at least one pixel wide so small renderings do not alias.

The renderer builds an *attenuation* map (soft tissue thickness minus lung
air plus bone); :mod:`training.phantoms` maps it to display values. Borders
that vary along the body axis (lung outlines, mediastinum, body outline) are
tabulated once per phantom and looked up with :func:`numpy.interp`, which
keeps a 1024-pixel phantom well under a second on two cores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

F32 = np.float32
_TABLE_V = np.linspace(-1.4, 1.4, 141)  # where the per-row outlines are tabulated


@dataclass(frozen=True)
class Grid:
    """Pixel centres mapped to anatomy coordinates (the positioning transform applied)."""

    u: np.ndarray
    v: np.ndarray
    px: float  # one pixel, in anatomy units
    size: int
    pose: tuple[float, float, float, float]  # rotation (rad), shift x, shift y, scale

    @classmethod
    def build(cls, size: int, rotation: float, shift: tuple[float, float], scale: float) -> Grid:
        """Map the detector grid into the patient's frame: rotate by ``rotation`` rad, shift, zoom."""
        if size < 16:
            raise ValueError(f"phantom size must be at least 16 pixels, got {size}")
        axis = (np.arange(size, dtype=F32) + F32(0.5)) * F32(2.0 / size) - F32(1.0)
        x = axis[None, :] - F32(shift[0])
        y = axis[:, None] - F32(shift[1])
        cos, sin = F32(math.cos(rotation) / scale), F32(math.sin(rotation) / scale)
        u = cos * x + sin * y
        v = cos * y - sin * x
        return cls(
            u=u.astype(F32),
            v=v.astype(F32),
            px=2.0 / size / scale,
            size=size,
            pose=(rotation, shift[0], shift[1], scale),
        )

    def crop(self, u0: float, u1: float, v0: float, v1: float) -> tuple[Grid, tuple[slice, slice]]:
        """The sub-grid of pixels that can see the anatomy box [u0, u1] x [v0, v1] (saves work on small parts)."""
        rotation, sx, sy, scale = self.pose
        cos, sin = math.cos(rotation) * scale, math.sin(rotation) * scale
        corners = [(cos * u - sin * v + sx, sin * u + cos * v + sy) for u in (u0, u1) for v in (v0, v1)]
        xs, ys = [c[0] for c in corners], [c[1] for c in corners]

        def to_slice(lo: float, hi: float) -> slice:
            first = max(0, math.floor((lo + 1.0) * self.size / 2.0) - 1)
            return slice(first, max(first, min(self.size, math.ceil((hi + 1.0) * self.size / 2.0) + 1)))

        window = (to_slice(min(ys), max(ys)), to_slice(min(xs), max(xs)))
        return Grid(u=self.u[window], v=self.v[window], px=self.px, size=self.size, pose=self.pose), window

    def edge(self, width: float) -> float:
        """An edge width in anatomy units, never sharper than 1.2 pixels."""
        return max(width, 1.2 * self.px)


def soft(distance: np.ndarray, width: float) -> np.ndarray:
    """0 outside, 1 inside, a linear ramp ``width`` wide centred on the border (distance 0)."""
    return np.asarray(np.clip(distance * F32(1.0 / width) + F32(0.5), 0.0, 1.0), dtype=F32)


def line_profile(distance: np.ndarray, half_width: float, px: float) -> np.ndarray:
    """Projected thickness of a cylinder, widened to a pixel and dimmed to keep its area (anti-aliasing)."""
    eff = max(half_width, 0.75 * px)
    gain = F32(half_width / eff)
    return np.sqrt(np.clip(F32(1.0) - np.square(distance * F32(1.0 / eff)), 0.0, 1.0)) * gain


@dataclass(frozen=True)
class Side:
    """One hemithorax. ``sign`` is -1 for image left (patient right) and +1 for image right."""

    sign: int
    width: float  # inner thoracic half-width at the costophrenic angle
    apex_v: float
    apex_u: float
    cp_v: float  # costophrenic angle level
    dome_v: float  # top of the hemidiaphragm dome
    dome_u: float
    hilum: tuple[float, float]  # (u, v) of the hilum, u signed


@dataclass(frozen=True)
class Anatomy:
    """Random normal anatomy of one patient (heart size comes from the cardiomegaly sign)."""

    right: Side  # image left
    left: Side  # image right
    mediastinum: float  # superior mediastinum half-width
    knob: float  # aortic knob bulge
    heart_tilt: float  # exponent of the right border's curve (higher: the atrial bulge sits lower)
    heart_aspect: float  # exponent of the left border's curve (higher: a rounder ventricle)
    heart_offset: float  # heart's right border, as a fraction of heart width, right of the midline
    body_width: float
    shoulder_v: float
    rib_spacing: float
    rib_jitter: tuple[float, ...]
    clavicle_v: float
    breasts: float  # 0 = no breast shadow, else its density
    vessels: tuple[np.ndarray, ...]  # per side: (angle, length, width, start, wiggle amp, freq, phase)

    @property
    def thoracic_width(self) -> float:
        """Inner rib-to-rib width at the costophrenic angles (the CTR's denominator)."""
        return self.right.width + self.left.width

    def sides(self) -> tuple[Side, Side]:
        return (self.right, self.left)


def draw_anatomy(rng: np.random.Generator, female: bool) -> Anatomy:
    """Draw one patient's normal anatomy: sizes, levels and vessel tree vary within plausible ranges."""
    half = rng.uniform(0.64, 0.74)
    cp_v = rng.uniform(0.42, 0.56)
    apex_v = rng.uniform(-0.80, -0.72)
    dome_rise = rng.uniform(0.16, 0.24)
    sides = []
    for sign, lower, hil_v in ((-1, 0.0, -0.10), (1, rng.uniform(0.02, 0.06), -0.15)):
        width = half * rng.uniform(0.96, 1.04)
        cp = cp_v + lower
        sides.append(
            Side(
                sign=sign,
                width=width,
                apex_v=apex_v + 0.5 * lower,
                apex_u=sign * width * rng.uniform(0.40, 0.48),
                cp_v=cp,
                dome_v=cp - dome_rise * rng.uniform(0.9, 1.1),
                dome_u=sign * width * rng.uniform(0.45, 0.55),
                hilum=(sign * rng.uniform(0.17, 0.21), hil_v + rng.uniform(-0.03, 0.03)),
            )
        )
    return Anatomy(
        right=sides[0],
        left=sides[1],
        mediastinum=rng.uniform(0.095, 0.12),
        knob=rng.uniform(0.03, 0.06),
        heart_tilt=rng.uniform(0.8, 1.3),
        heart_aspect=rng.uniform(0.5, 1.0),
        heart_offset=rng.uniform(0.28, 0.36),
        body_width=rng.uniform(0.90, 1.0),
        shoulder_v=rng.uniform(-1.3, -1.12),
        rib_spacing=rng.uniform(0.125, 0.145),
        rib_jitter=tuple(rng.uniform(-0.012, 0.012, 13)),
        clavicle_v=apex_v + rng.uniform(0.07, 0.13),
        breasts=rng.uniform(0.10, 0.2) if female and rng.random() < 0.7 else 0.0,
        vessels=(_draw_vessels(rng), _draw_vessels(rng)),
    )


def _draw_vessels(rng: np.random.Generator) -> np.ndarray:
    """Three generations of vessels out of a hilum: rows (angle, length, width, start, amp, freq, phase, generation)."""
    rows = []
    generations = (
        (7, (0.30, 0.42), 0.017, 0.0),
        (20, (0.36, 0.52), 0.010, 0.04),
        (48, (0.42, 0.58), 0.0055, 0.1),
    )
    for generation, (count, length, width, start) in enumerate(generations):
        angle = np.sort(rng.uniform(-1.6, 1.3, count))
        rows.append(
            np.stack(
                [
                    angle,
                    rng.uniform(*length, count),
                    width * rng.uniform(0.7, 1.3, count),
                    start + rng.uniform(0.0, 0.06, count),
                    rng.uniform(0.06, 0.16, count),
                    rng.uniform(5.0, 12.0, count),
                    rng.uniform(0, 2 * math.pi, count),
                    np.full(count, generation),
                ],
                axis=1,
            )
        )
    return np.concatenate(rows).astype(F32)


def heart_borders(anatomy: Anatomy, ctr: float) -> tuple[np.ndarray, np.ndarray]:
    """Right and left heart borders (distance from the midline) tabulated along ``_TABLE_V``.

    The silhouette grows out of the mediastinum below the hila, the right
    (atrial) border bulging low and the left (ventricular) border sweeping
    out to the apex; both reach their widest where the heart meets the higher
    dome and close below the diaphragm, where they are hidden. The widest
    extent is exactly ``ctr`` times the thoracic width.
    """
    total = ctr * anatomy.thoracic_width
    grow = max(0.0, ctr - 0.45)
    right_max, left_max = anatomy.heart_offset * total, (1.0 - anatomy.heart_offset) * total
    top = anatomy.left.hilum[1] + 0.06 - 0.2 * grow
    base = min(anatomy.left.dome_v, anatomy.right.dome_v) - 0.03 + 0.15 * grow
    t = np.clip((_TABLE_V - top) / (base - top), 0.0, 1.0)
    below = np.clip((_TABLE_V - base - 0.04) / 0.18, 0.0, 1.0)
    closure = np.sqrt(1.0 - below**2)
    neck = anatomy.mediastinum - 0.01
    right = (neck + (right_max - neck) * np.sin(0.5 * math.pi * t**anatomy.heart_tilt) ** 2) * closure
    left = (neck + (left_max - neck) * np.sin(0.5 * math.pi * t) ** anatomy.heart_aspect) * closure
    inside = _TABLE_V >= top
    return np.where(inside, right, 0.0).astype(F32), np.where(inside, left, 0.0).astype(F32)


def heart_field(grid: Grid, anatomy: Anatomy, ctr: float) -> np.ndarray:
    """Soft heart silhouette (1 inside)."""
    right, left = heart_borders(anatomy, ctr)
    inside = np.minimum(
        np.interp(grid.v, _TABLE_V, right) + grid.u, np.interp(grid.v, _TABLE_V, left) - grid.u
    )
    return soft(inside.astype(F32), grid.edge(0.006))


def diaphragm_v(side: Side, lateral: np.ndarray) -> np.ndarray:
    """Level of the hemidiaphragm at lateral distance ``lateral`` (>= 0) from the midline."""
    peak = abs(side.dome_u)
    outer = np.square((lateral - F32(peak)) * F32(1.0 / (side.width - peak))) * F32(side.cp_v - side.dome_v)
    inner = np.square((F32(peak) - lateral) * F32(1.0 / peak)) * F32(0.07)
    return np.asarray(F32(side.dome_v) + np.where(lateral > peak, outer, inner), dtype=F32)


def lung_borders(side: Side, anatomy: Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Lateral and medial borders (lateral distance from the midline) tabulated along ``_TABLE_V``."""
    t = np.clip((_TABLE_V - side.apex_v) / (side.cp_v - side.apex_v), 0.0, 1.0)
    apex = abs(side.apex_u)
    lateral = apex + (side.width - apex) * np.sqrt(1.0 - (1.0 - t) ** 2.2)
    mediastinum = anatomy.mediastinum + 0.004 * (_TABLE_V + 1.0)
    mediastinum = mediastinum + 0.035 * np.clip((_TABLE_V - side.hilum[1] + 0.02) / 0.2, 0.0, 1.0) ** 2
    if side.sign > 0:  # aortic knob and pulmonary trunk on the patient's left
        mediastinum = mediastinum + anatomy.knob * np.exp(-(((_TABLE_V - side.hilum[1] + 0.17) / 0.07) ** 2))
        trunk = np.clip((_TABLE_V - side.hilum[1] + 0.10) / 0.12, 0.0, 1.0)
        mediastinum = mediastinum + 0.6 * anatomy.knob * np.sqrt(trunk)
    tm = np.clip((_TABLE_V - side.apex_v) / 0.22, 0.0, 1.0)
    medial = np.maximum(mediastinum, apex - (apex - mediastinum) * np.sqrt(1.0 - (1.0 - tm) ** 2))
    lateral = np.where(t <= 0, apex, lateral)
    return lateral.astype(F32), medial.astype(F32)


@dataclass(frozen=True)
class Lung:
    """One lung field on the grid: a soft inside mask and the distances the signs need."""

    field: np.ndarray  # soft 0..1, aerated lung before the heart is subtracted
    to_lateral: np.ndarray  # distance to the lateral (rib) border, anatomy units
    lateral: np.ndarray  # lateral distance from the midline (>= 0 inside this hemithorax)
    medial_border: np.ndarray
    lateral_border: np.ndarray


def lung_field(grid: Grid, side: Side, anatomy: Anatomy) -> Lung:
    """One lung: between mediastinum and ribs, below the apex, above the hemidiaphragm."""
    lat_tab, med_tab = lung_borders(side, anatomy)
    lat_border = np.interp(grid.v, _TABLE_V, lat_tab).astype(F32)
    med_border = np.interp(grid.v, _TABLE_V, med_tab).astype(F32)
    lateral = grid.u * F32(side.sign)
    to_lateral = lat_border - lateral
    inside = np.minimum(np.minimum(to_lateral, lateral - med_border), diaphragm_v(side, lateral) - grid.v)
    inside = np.minimum(inside, (grid.v - F32(side.apex_v)) * F32(0.6))
    return Lung(
        field=soft(inside, grid.edge(0.008)),
        to_lateral=to_lateral,
        lateral=lateral,
        medial_border=med_border,
        lateral_border=lat_border,
    )


def lung_depth(lung: Lung) -> np.ndarray:
    """Air thickness inside a lung: thin at the edges, full a few cm inside (why lungs darken centrally)."""
    inner = np.minimum(lung.to_lateral, lung.lateral - lung.medial_border)
    return np.asarray(lung.field * np.sqrt(np.clip(inner * F32(1.0 / 0.16), 0.05, 1.0)), dtype=F32)


def body_thickness(grid: Grid, anatomy: Anatomy) -> np.ndarray:
    """Soft tissue: a trunk cylinder whose shoulders slope up into the neck."""
    t = np.clip((_TABLE_V - anatomy.shoulder_v) / 0.38, 0.0, 1.0)
    half = 0.22 + (anatomy.body_width - 0.22) * np.sin(0.5 * math.pi * t) ** 0.6
    half_w = np.interp(grid.v, _TABLE_V, half).astype(F32)
    rel = np.abs(grid.u) / half_w
    inside = soft((F32(1.0) - rel) * half_w, grid.edge(0.012))
    return np.asarray(
        (np.sqrt(np.clip(F32(1.0) - np.square(rel), 0.0, 1.0)) * F32(0.75) + F32(0.25)) * inside, dtype=F32
    )


def _rib_band(t: np.ndarray, levels: np.ndarray, thickness: float, px: float) -> np.ndarray:
    """Bone thickness across the ribs whose centre lines sit at ``levels`` of the curve coordinate ``t``."""
    index = np.interp(t, levels, np.arange(len(levels), dtype=F32)).astype(F32)
    nearest = np.clip(np.rint(index), 0, len(levels) - 1).astype(np.intp)
    offset = t - levels[nearest]
    inside = line_profile(offset, thickness, px)
    cortex = line_profile(np.abs(offset) - F32(0.85 * thickness), 0.15 * thickness, px)
    return inside * F32(0.6) + cortex * F32(0.5)


def ribs(grid: Grid, anatomy: Anatomy, side: Side) -> np.ndarray:
    """Posterior arcs (bright, near horizontal, curving down laterally) and fainter anterior arcs."""
    lateral = grid.u * F32(side.sign)
    width = F32(side.width)
    start = side.apex_v - 0.06
    levels = (
        start
        + anatomy.rib_spacing * np.arange(13) * (1 + 0.035 * np.arange(13))
        + np.asarray(anatomy.rib_jitter)
    ).astype(F32)
    rel = lateral * F32(1.0 / side.width)
    posterior_t = grid.v - F32(0.09) * np.square(rel - F32(0.3)) - F32(0.10) * np.square(np.square(rel))
    posterior = _rib_band(posterior_t, levels, 0.022, grid.px)
    posterior *= soft(lateral - F32(0.09), grid.edge(0.03)) * soft(
        width + F32(0.05) - lateral, grid.edge(0.09)
    )
    end_v = F32(0.09 * 0.49 + 0.10)  # the posterior curve's drop at the lateral border (rel = 1)
    anterior_t = grid.v - end_v - F32(0.62) * (width - lateral) + F32(0.35) * np.square(width - lateral)
    anterior = _rib_band(anterior_t, levels - F32(0.02), 0.03, grid.px)
    anterior *= soft(lateral - F32(0.25), grid.edge(0.08)) * soft(
        width + F32(0.02) - lateral, grid.edge(0.04)
    )
    anterior *= soft(F32(levels[7]) - anterior_t, grid.edge(0.05))
    below = soft(F32(side.cp_v + 0.02) - grid.v, 0.12) * F32(0.8) + F32(0.2)
    return (posterior * F32(0.12) + anterior * F32(0.05)) * below


def clavicles(grid: Grid, anatomy: Anatomy) -> np.ndarray:
    """Two S-shaped bars from the sternal notch out and up to the shoulders."""
    lateral = np.abs(grid.u)
    centre = (
        F32(anatomy.clavicle_v) - F32(0.20) * (lateral - F32(0.1)) + F32(0.03) * np.sin(lateral * F32(7.0))
    )
    bone = line_profile(grid.v - centre, 0.026, grid.px)
    cortex = line_profile(np.abs(grid.v - centre) - F32(0.022), 0.005, grid.px)
    extent = soft(lateral - F32(0.07), grid.edge(0.02)) * soft(F32(0.70) - lateral, grid.edge(0.06))
    return np.asarray((bone * F32(0.20) + cortex * F32(0.10)) * extent, dtype=F32)


def spine(grid: Grid, anatomy: Anatomy) -> np.ndarray:
    """Vertebral bodies with darker disc spaces and paired pedicles, faint through the mediastinum."""
    period = F32(anatomy.rib_spacing * 0.95)
    phase = np.mod(grid.v * F32(1.0 / period), F32(1.0)) - F32(0.5)
    half = F32(0.07) + F32(0.01) * grid.v
    body = line_profile(grid.u, 0.075, grid.px) * (
        F32(0.7) + F32(0.3) * soft(F32(0.40) - np.abs(phase), 0.08)
    )
    pedicle_u = np.abs(np.abs(grid.u) - half * F32(0.72))
    pedicle = np.clip(
        F32(1.0) - np.square(pedicle_u * F32(1.0 / 0.014)) - np.square((phase + F32(0.15)) * F32(5.0)),
        0.0,
        1.0,
    )
    return np.asarray(
        (body * F32(0.10) + np.sqrt(pedicle) * F32(0.04)) * soft(F32(0.9) - grid.v, 0.1), dtype=F32
    )


def breasts(grid: Grid, anatomy: Anatomy) -> np.ndarray:
    """Breast shadows over the lower lateral lungs, with the sharper inferior margin seen on films."""
    if anatomy.breasts <= 0:
        return np.zeros_like(grid.u)
    out = np.zeros_like(grid.u)
    for side in anatomy.sides():
        du = (grid.u - F32(side.sign * side.width * 0.62)) * F32(1.0 / 0.36)
        dv = (grid.v - F32(side.cp_v - 0.06)) * F32(1.0 / 0.26)
        r = np.sqrt(np.square(du) + np.square(dv))
        out += np.sqrt(np.clip(F32(1.0) - np.square(r), 0.0, 1.0)) * soft(F32(1.0) - r, grid.edge(0.02) / 0.3)
    return out * F32(anatomy.breasts)


def chest_wall(grid: Grid, side: Side, lung: Lung) -> np.ndarray:
    """What overlies one lung: the scapula's plate and medial border, and more soft tissue at apex and base."""
    lateral = lung.lateral
    top, bottom = F32(side.apex_v + 0.03), F32(side.apex_v + 0.55)
    medial_u = F32(0.62 * side.width) + (grid.v - top) * F32(0.45 * side.width / 0.55)
    inside_medial = lateral - medial_u
    inside_lower = (bottom - grid.v) - (lateral - medial_u) * F32(1.4)
    plate = soft(np.minimum(inside_medial, inside_lower), grid.edge(0.01)) * soft(
        grid.v - top, grid.edge(0.04)
    )
    plate *= soft(F32(side.width + 0.06) - lateral, 0.06)
    border = line_profile(inside_medial - F32(0.008), 0.006, grid.px) * soft(inside_lower, grid.edge(0.02))
    border *= soft(grid.v - top, grid.edge(0.04))
    span = F32(side.cp_v - side.hilum[1])
    base = np.clip((grid.v - F32(side.hilum[1])) / span, 0.0, 1.0)
    apex = np.clip((F32(side.apex_v + 0.22) - grid.v) * F32(1.0 / 0.22), 0.0, 1.0)
    overlap = (np.square(base) * F32(0.06) + apex * F32(0.05)) * lung.field
    return np.asarray(plate * F32(0.035) + border * F32(0.03) + overlap, dtype=F32)
