"""Synthetic chest radiograph phantoms with heart-failure signs, masks and a BNP.

No chest radiographs can be downloaded where this project is built and
tested, so the demo model, the tests and the rationale benchmark run on
these phantoms: a frontal (PA) chest with random normal anatomy
(:mod:`training.phantom_anatomy`), zero or more heart-failure signs with a
severity and a pixel mask each, and a synthetic BNP that depends on the
signs (:mod:`training.phantom_signs`). A rationale for a positive phantom
should fall on its masks.

A phantom is a pure function of its seed: the same seed gives the same
patient at any size (only the pixel noise differs), so a model trained on
64-pixel phantoms can be checked against the 1024-pixel DICOM of the same
seed.

Every phantom has a **healthy twin** (:func:`make_twin`): the same patient,
anatomy, pose, exposure and noise drawn with no signs and the patient's own
normal heart size. ``image - twin`` is exactly what the disease added, the
ground truth a counterfactual explanation should recover; outside the
:func:`change_masks` it is zero.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np

from training.phantom_anatomy import (
    F32,
    Anatomy,
    Grid,
    body_thickness,
    breasts,
    chest_wall,
    clavicles,
    diaphragm_v,
    draw_anatomy,
    heart_field,
    lung_depth,
    lung_field,
    ribs,
    soft,
    spine,
)
from training.phantom_signs import (
    BNP_THRESHOLD,
    SIGNS,
    SignState,
    draw_signs,
    edema_mask,
    effusion_fluid,
    kerley_lines,
    parenchyma,
    perihilar_haze,
    sample_texture,
    upper_zone_mask,
    vessels,
)

__all__ = [
    "SIGNS",
    "Demographics",
    "Phantom",
    "anatomy_masks",
    "change_masks",
    "demographics",
    "make_phantom",
    "make_twin",
    "write_phantoms",
]

logger = logging.getLogger(__name__)
Part = Callable[[Grid], np.ndarray]

# Independent random streams per aspect, so changing how anatomy is drawn never changes a phantom's BNP.
_SIGNS_STREAM, _ANATOMY_STREAM, _EXPOSURE_STREAM, _PATIENT_STREAM, _NOISE_STREAM = 1, 2, 3, 4, 5
CSV_COLUMNS = ("path", "bnp", "label", *SIGNS, "ctr", "effusion_right", "effusion_left",
               *(f"mask_{name}" for name in SIGNS), "twin")


@dataclass(frozen=True)
class Phantom:
    """One synthetic frontal chest radiograph.

    ``image`` is float32 in [0, 1], MONOCHROME2 (bright = more attenuation);
    ``masks`` holds a boolean mask per sign in :data:`SIGNS`, all False
    exactly when the sign's severity is 0. ``effusion_sides`` is the effusion
    severity on the patient's (right, left): image left, image right of a PA view.
    """

    image: np.ndarray
    masks: dict[str, np.ndarray]
    severities: dict[str, float]
    ctr: float
    bnp: float
    seed: int
    effusion_sides: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if self.image.ndim != 2 or self.image.dtype != np.float32:
            raise ValueError(f"image must be a 2-D float32 array, got {self.image.dtype} {self.image.shape}")
        if set(self.masks) != set(SIGNS) or set(self.severities) != set(SIGNS):
            raise ValueError(f"masks and severities must name exactly {SIGNS}")
        for name, mask in self.masks.items():
            if mask.shape != self.image.shape or mask.dtype != np.bool_:
                raise ValueError(
                    f"mask {name} must be bool {self.image.shape}, got {mask.dtype} {mask.shape}"
                )
        if self.bnp <= 0:
            raise ValueError(f"bnp must be positive (ng/L), got {self.bnp}")

    @property
    def label(self) -> bool:
        """Heart failure as the paper defines it: BNP >= 100 ng/L."""
        return self.bnp >= BNP_THRESHOLD

    @property
    def size(self) -> int:
        return int(self.image.shape[0])


@dataclass(frozen=True)
class Demographics:
    """The synthetic patient behind a seed (the DICOM writer uses the same one)."""

    sex: Literal["F", "M"]
    age: int


def demographics(seed: int) -> Demographics:
    """Sex and age of the phantom patient; females get breast shadows more often than not."""
    rng = _rng(seed, _PATIENT_STREAM)
    sex: Literal["F", "M"] = "F" if rng.random() < 0.5 else "M"
    return Demographics(sex=sex, age=int(rng.integers(35, 91)))


@dataclass(frozen=True)
class _Exposure:
    rotation: float
    shift: tuple[float, float]
    scale: float
    low: float
    high: float
    gamma: float
    noise: float
    tilt: tuple[float, float] = field(default=(0.0, 0.0))
    shoulder: float = 1.0


def _rng(seed: int, stream: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, *extra])


def _draw_exposure(seed: int) -> _Exposure:
    rng = _rng(seed, _EXPOSURE_STREAM)
    return _Exposure(
        rotation=math.radians(rng.uniform(-3.0, 3.0)),
        shift=(rng.uniform(-0.04, 0.04), rng.uniform(-0.03, 0.05)),
        scale=rng.uniform(0.92, 1.05),
        low=rng.uniform(0.05, 0.15),
        high=rng.uniform(1.25, 1.45),
        gamma=rng.uniform(1.0, 1.5),
        noise=rng.uniform(0.006, 0.02),
        tilt=(rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)),
        shoulder=rng.uniform(0.8, 1.6),
    )


def _check(seed: int, size: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 16 <= size <= 8192:
        raise ValueError(f"size must be an integer between 16 and 8192 pixels, got {size!r}")


def _setup(seed: int, size: int, healthy: bool = False) -> tuple[Grid, Anatomy, SignState, _Exposure]:
    _check(seed, size)
    state = draw_signs(_rng(seed, _SIGNS_STREAM))
    if healthy:
        state = state.healthy()
    anatomy = draw_anatomy(_rng(seed, _ANATOMY_STREAM), female=demographics(seed).sex == "F")
    exposure = _draw_exposure(seed)
    grid = Grid.build(int(size), exposure.rotation, exposure.shift, exposure.scale)
    return grid, anatomy, state, exposure


def _add(target: np.ndarray, grid: Grid, box: tuple[float, float, float, float], part: Part) -> None:
    """Add ``part`` drawn only on the pixels that can see the anatomy ``box`` (u0, u1, v0, v1)."""
    sub, window = grid.crop(*box)
    target[window] += part(sub)


def _trachea(grid: Grid, carina: float) -> np.ndarray:
    bend = F32(0.03) * np.clip(grid.v - F32(carina), 0.0, 1.0)
    tube = soft(F32(0.032) - np.abs(grid.u + F32(0.012) + bend), grid.edge(0.01))
    return np.asarray(-tube * soft(F32(carina) - grid.v, grid.edge(0.03)) * F32(0.10), dtype=F32)


def _hilum(grid: Grid, centre: tuple[float, float]) -> np.ndarray:
    du = (grid.u - F32(centre[0])) * F32(1.0 / 0.07)
    dv = (grid.v - F32(centre[1])) * F32(1.0 / 0.11)
    return np.asarray(np.exp(-(np.square(du) + np.square(dv))) * F32(0.10), dtype=F32)


def _gastric_bubble(grid: Grid, anatomy: Anatomy, centre: tuple[float, float]) -> np.ndarray:
    r = np.sqrt(
        np.square((grid.u - F32(centre[0])) * F32(1.0 / 0.09))
        + np.square((grid.v - F32(centre[1])) * F32(1.0 / 0.05))
    )
    below = soft(grid.v - diaphragm_v(anatomy.left, np.abs(grid.u)) - F32(0.015), grid.edge(0.01))
    return np.asarray(-soft(F32(1.0) - r, grid.edge(0.01) / 0.06) * below * F32(0.18), dtype=F32)


def _central(grid: Grid, anatomy: Anatomy, attenuation: np.ndarray) -> None:
    """Spine, clavicles, trachea, hila, gastric bubble and breasts, each drawn only where it can be."""
    _add(attenuation, grid, (-0.17, 0.17, -1.5, 1.5), lambda g: spine(g, anatomy))
    clav = anatomy.clavicle_v
    _add(attenuation, grid, (-0.8, 0.8, clav - 0.22, clav + 0.08), lambda g: clavicles(g, anatomy))
    carina = anatomy.right.hilum[1] - 0.12
    _add(attenuation, grid, (-0.12, 0.12, -1.5, carina + 0.06), lambda g: _trachea(g, carina))
    for hu, hv in (side.hilum for side in anatomy.sides()):
        _add(attenuation, grid, (hu - 0.2, hu + 0.2, hv - 0.3, hv + 0.3), partial(_hilum, centre=(hu, hv)))
    bubble = (anatomy.left.width * 0.45, anatomy.left.dome_v + 0.10)
    box = (bubble[0] - 0.11, bubble[0] + 0.11, bubble[1] - 0.07, bubble[1] + 0.07)
    _add(attenuation, grid, box, lambda g: _gastric_bubble(g, anatomy, bubble))
    if anatomy.breasts > 0:
        low = min(side.cp_v for side in anatomy.sides())
        _add(attenuation, grid, (-1.0, 1.0, low - 0.4, low + 0.3), lambda g: breasts(g, anatomy))


def _hemithorax(
    grid: Grid, anatomy: Anatomy, state: SignState, heart: np.ndarray, seed: int
) -> Iterator[tuple[tuple[slice, slice], np.ndarray, dict[str, np.ndarray]]]:
    """Per side: the window, the attenuation it adds and how much of each pixel each sign covers."""
    severity = state.severities
    texture = parenchyma(_rng(seed, _ANATOMY_STREAM, 1))
    for index, side in enumerate(anatomy.sides()):
        u_range = sorted((0.0, side.sign * (side.width + 0.12)))
        sub, window = grid.crop(u_range[0], u_range[1], side.apex_v - 0.15, side.cp_v + 0.15)
        lung = lung_field(sub, side, anatomy)
        behind_heart = F32(1.0) - heart[window] * F32(0.93)
        fluid = effusion_fluid(sub, side, lung, state.effusion_sides[index])
        air = lung_depth(lung) * behind_heart * (F32(1.0) - fluid)
        vessel = vessels(sub, anatomy, side, severity["venous_diversion"]) * lung.field
        vessel *= (F32(1.0) - F32(0.6) * heart[window]) * (F32(1.0) - fluid)
        mottle = sample_texture(texture, sub) * lung.field * (F32(1.0) - fluid) * F32(0.025)
        added = (
            ribs(sub, anatomy, side)
            + chest_wall(sub, side, lung)
            - air * F32(0.55)
            + vessel * F32(0.09)
            + mottle
        )
        if severity["edema"] > 0:
            haze = perihilar_haze(sub, side, lung) * F32(0.06 + 0.10 * severity["edema"])
            lines = kerley_lines(sub, side, lung, severity["edema"], seed) * F32(
                0.08 + 0.10 * severity["edema"]
            )
            added += (haze + lines) * (F32(1.0) - fluid)
        masks = {
            "effusion": fluid * lung.field,
            "venous_diversion": upper_zone_mask(sub, side, lung),
            "edema": edema_mask(sub, side, lung),
        }
        yield window, added, masks


def _render(seed: int, size: int, healthy: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray], SignState]:
    grid, anatomy, state, exposure = _setup(seed, size, healthy)
    heart = np.zeros((size, size), dtype=F32)
    _add(heart, grid, (-0.55, 0.75, -0.6, 1.1), lambda g: heart_field(g, anatomy, state.ctr))
    attenuation = body_thickness(grid, anatomy) + heart * F32(0.03)
    _central(grid, anatomy, attenuation)
    cover = {name: np.zeros((size, size), dtype=F32) for name in SIGNS}
    for window, added, side_cover in _hemithorax(grid, anatomy, state, heart, seed):
        attenuation[window] += added
        for name, part in side_cover.items():
            np.maximum(cover[name][window], part, out=cover[name][window])
    masks = {name: _mask(cover[name]) if state.severities[name] > 0 else cover[name] > 1 for name in SIGNS}
    if state.severities["cardiomegaly"] > 0:
        # the enlarged heart's whole footprint (soft border and the part under the domes included):
        # everything the twin's normal heart lacks lies inside it
        masks["cardiomegaly"] = heart > 0
    return _display(attenuation, grid, exposure, seed), masks, state


def _mask(cover: np.ndarray) -> np.ndarray:
    """Pixels the sign touches at all (soft borders included, so the twin differs only inside the masks)."""
    mask = cover > 0
    if not mask.any() and cover.max() > 0:
        mask = cover >= cover.max()
    return np.asarray(mask, dtype=bool)


def _display(attenuation: np.ndarray, grid: Grid, exposure: _Exposure, seed: int) -> np.ndarray:
    """Attenuation to display values: window, tone curve, heel-effect tilt and quantum noise."""
    tilt = F32(exposure.tilt[0]) * grid.u + F32(exposure.tilt[1]) * grid.v
    linear = np.clip(
        (attenuation + tilt - F32(exposure.low)) * F32(1.0 / (exposure.high - exposure.low)), 0.0, 1.0
    )
    # film-like shoulder: dense regions (heart, spine) lose contrast, lungs keep it
    norm = F32(1.0 / (1.0 - math.exp(-exposure.shoulder)))
    value = np.asarray(
        ((F32(1.0) - np.exp(-F32(exposure.shoulder) * linear)) * norm) ** F32(exposure.gamma), dtype=F32
    )
    noise = _rng(seed, _NOISE_STREAM, grid.size).standard_normal(value.shape, dtype=F32)
    # quantum noise per pixel falls as pixels grow (fewer, larger pixels collect more photons each)
    value += noise * F32(exposure.noise * min(1.0, grid.size / 1024) ** 0.5) * (F32(0.5) + value)
    return np.clip(value, 0.0, 1.0).astype(F32)


def make_phantom(seed: int, size: int = 1024) -> Phantom:
    """Draw phantom number ``seed`` at ``size`` x ``size`` pixels.

    Parameters
    ----------
    seed:
        Non-negative integer; the whole phantom (anatomy, signs, BNP, pose)
        follows from it.
    size:
        Pixels per side (16 to 8192). The same seed gives the same patient at
        every size.

    Raises
    ------
    ValueError
        If ``seed`` is negative or ``size`` is out of range.
    """
    image, masks, state = _render(seed, size)
    return Phantom(
        image=image,
        masks=masks,
        severities=dict(state.severities),
        ctr=state.ctr,
        bnp=state.bnp,
        seed=int(seed),
        effusion_sides=state.effusion_sides,
    )


def make_twin(seed: int, size: int = 1024) -> np.ndarray:
    """The healthy twin of phantom ``seed``: same patient, pose, exposure and noise, no signs (float32 image)."""
    image, _, _ = _render(seed, size, healthy=True)
    return image


def change_masks(phantom: Phantom, twin: np.ndarray, tolerance: float = 1e-6) -> np.ndarray:
    """Pixels where the disease changed the image (``|image - twin| > tolerance``)."""
    if twin.shape != phantom.image.shape:
        raise ValueError(f"twin shape {twin.shape} != phantom shape {phantom.image.shape}")
    return np.asarray(np.abs(phantom.image - twin) > tolerance, dtype=bool)


def anatomy_masks(seed: int, size: int = 1024) -> dict[str, np.ndarray]:
    """Boolean ``heart`` and ``lungs`` masks of phantom ``seed``, present even in a normal phantom.

    For measuring: the cardiothoracic ratio is the heart's widest extent over
    the lungs' widest extent (rib to rib), whether or not the heart is enlarged.
    """
    grid, anatomy, state, _ = _setup(seed, size)
    lungs = np.zeros((size, size), dtype=bool)
    for side in anatomy.sides():
        lungs |= lung_field(grid, side, anatomy).field > 0.5
    return {"heart": heart_field(grid, anatomy, state.ctr) > 0.5, "lungs": lungs}


def _csv_row(phantom: Phantom, image: str, masks: dict[str, str]) -> dict[str, str]:
    row = {
        "path": image,
        "bnp": f"{phantom.bnp:.2f}",
        "label": str(int(phantom.label)),
        "ctr": f"{phantom.ctr:.4f}",
        "effusion_right": f"{phantom.effusion_sides[0]:.4f}",
        "effusion_left": f"{phantom.effusion_sides[1]:.4f}",
        "twin": "",
    }
    for name in SIGNS:
        row[name] = f"{phantom.severities[name]:.4f}"
        row[f"mask_{name}"] = masks.get(name, "")
    return row


def write_phantoms(
    n: int,
    seed: int,
    out: Path,
    fmt: Literal["dicom", "png"],
    size: int = 1024,
    progress: Callable[[int], object] | None = None,
    twins: bool = False,
) -> Path:
    """Write ``n`` phantoms (seeds ``seed`` .. ``seed + n - 1``), their sign masks and ``labels.csv``.

    Images go to ``out/images`` (DICOM DX, or 8-bit PNG), one PNG mask per
    present sign to ``out/masks``; the CSV's paths are relative to ``out``.
    ``progress`` is called with 1 after each phantom (a progress bar's update).
    With ``twins``, each phantom's healthy twin goes to ``out/twins`` in the same
    format, and its path to the CSV's ``twin`` column.

    Returns
    -------
    Path
        The CSV (``out/labels.csv``).

    Raises
    ------
    ValueError
        If ``n`` < 1, ``fmt`` is not "dicom" or "png", or seed/size are invalid.
    """
    if fmt not in ("dicom", "png"):
        raise ValueError(f"format must be 'dicom' or 'png', got {fmt!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    _check(seed, size)
    from training.phantom_dicom import (  # pydicom only when files are written
        save_dicom,
        save_png,
        save_twin_dicom,
        write_atomic,
    )

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    if twins:
        (out / "twins").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(n):
        phantom = make_phantom(seed + index, size)
        stem = f"phantom_{seed + index:06d}"
        image = f"images/{stem}.{'dcm' if fmt == 'dicom' else 'png'}"
        if fmt == "dicom":
            save_dicom(phantom, out / image)
        else:
            save_png(phantom.image, out / image)
        masks = {}
        for name in SIGNS:
            if phantom.severities[name] > 0:
                masks[name] = f"masks/{stem}_{name}.png"
                save_png(phantom.masks[name], out / masks[name])
        row = _csv_row(phantom, image, masks)
        if twins:
            row["twin"] = f"twins/{stem}_twin.{'dcm' if fmt == 'dicom' else 'png'}"
            twin = Phantom(make_twin(seed + index, size), {n: np.zeros_like(m) for n, m in phantom.masks.items()},
                           {n: 0.0 for n in SIGNS}, phantom.ctr, phantom.bnp, phantom.seed)
            if fmt == "dicom":
                save_twin_dicom(twin, out / row["twin"])
            else:
                save_png(twin.image, out / row["twin"])
        rows.append(row)
        if progress is not None:
            progress(1)
    csv_path = out / "labels.csv"

    def write_csv(target: Path) -> None:
        with target.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    write_atomic(csv_path, write_csv)
    logger.info("wrote %d phantoms (seeds %d..%d, %s, %d px) to %s", n, seed, seed + n - 1, fmt, size, out)
    return csv_path
