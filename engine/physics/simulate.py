"""Physics simulator: atoms → tilt series in the geometry contract (independent-atom potential).

Each atom's projected potential is Peng et al. (1996)'s 5-Gaussian elastic scattering factor turned
into a sum of 2D Gaussians (`engine.core.elements.projected_potential_gaussians`), smeared by its thermal
B-factor, so a whole specimen is a sum of isotropic 3D Gaussians and the projector renders it
exactly (line integrals of Gaussians are Gaussians). Then microscope blur (Å), per-projection
shifts, and additive Gaussian and/or Poisson (dose) noise. Units of the result: projected potential,
V·Å, as abTEM's.
"""

from __future__ import annotations

import numpy as np

from engine.io.atoms import Atoms, UNKNOWN_SPECIES
from engine.core.elements import projected_potential_gaussians
from engine.core.errors import InputError
from engine.core.geometry import TiltGeometry
from engine.physics.forward import ForwardModel
from engine.io.tiltseries import TiltSeries


MAX_PROJECTIONS = 100_000
"""More tilts than this in a range is a typo (a tilt series has tens to a few hundred)."""


def parse_tilt_range(text: str) -> np.ndarray:
    """'-70:70:2' → tilt angles −70, −68, …, 70 (degrees, end included when on the grid)."""
    try:
        start, stop, step = (float(v) for v in text.split(":"))
    except (ValueError, AttributeError):
        raise InputError("--tilts", f"expected START:STOP:STEP in degrees, got {text!r}") from None
    if not all(np.isfinite([start, stop, step])):
        raise InputError("--tilts", f"START, STOP and STEP must be finite numbers of degrees, got {text!r}")
    if step <= 0 or stop < start:
        raise InputError("--tilts", f"need STOP >= START and STEP > 0, got {text!r}")
    count = np.floor((stop - start) / step + 1e-9) + 1
    if count > MAX_PROJECTIONS:
        raise InputError("--tilts", f"{text!r} gives {count:.3g} projections; at most {MAX_PROJECTIONS} "
                                    "(a tilt series has tens to a few hundred)")
    return start + step * np.arange(int(count))


def check_image_shape(shape, source="--shape") -> tuple[int, int]:
    """(H, W) as two whole numbers of pixels >= 1; InputError naming ``source`` otherwise."""
    try:
        ok = len(shape) == 2 and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in shape)
    except TypeError:
        ok = False
    if not ok:
        raise InputError(source, f"the image size must be two whole numbers H W of pixels, got {shape!r}")
    if min(shape) < 1:
        raise InputError(source, f"the image size must be at least 1 x 1 px, got {shape[0]} x {shape[1]}")
    return int(shape[0]), int(shape[1])


def specimen_gaussians(atoms: Atoms, b_factor: float = 0.0):
    """Positions (M, 3) Å, weights (M,) V·Å³ and widths (M,) Å of the 5 Gaussians of every atom.

    The per-atom column 'b_factor' (Å²) overrides ``b_factor`` where present.
    """
    if len(atoms) == 0:
        raise InputError("structure", "the structure has no atoms")
    b_atoms = atoms.columns.get("b_factor", np.full(len(atoms), float(b_factor)))
    positions, weights, sigmas = [], [], []
    for symbol in np.unique(atoms.species):
        if symbol == UNKNOWN_SPECIES:
            raise InputError("structure", "cannot simulate atoms of unknown species 'X'")
        mask = atoms.species == symbol
        for b in np.unique(b_atoms[mask]):
            sel = mask & (b_atoms == b)
            w, s = projected_potential_gaussians(str(symbol), float(b))
            positions.append(np.repeat(atoms.positions[sel], len(w), axis=0))
            weights.append(np.tile(w, sel.sum()))
            sigmas.append(np.tile(s, sel.sum()))
    return np.concatenate(positions), np.concatenate(weights), np.concatenate(sigmas)


def simulate_tilt_series(atoms: Atoms, angles_deg, pixel_size: float, shape, blur_sigma: float = 0.0,
                         b_factor: float = 0.0, noise: float = 0.0, peak_counts: float | None = None,
                         shifts=None, seed: int = 0, description: str = "",
                         geometry: TiltGeometry | None = None, intensity_scale=None) -> TiltSeries:
    """Simulate a tilt series of ``atoms``.

    angles_deg  : tilt angles (degrees), active rotation about +y.
    pixel_size  : Å per pixel; shape: (H, W) pixels.
    blur_sigma  : Gaussian blur σ of the microscope (Å).
    b_factor    : Debye–Waller B (Å²) for atoms without a 'b_factor' column; B = 8π²⟨u_x²⟩.
    noise       : additive white Gaussian noise σ as a fraction of the clean series' maximum.
    peak_counts : Poisson noise: mean electron counts at the brightest clean pixel (None = no Poisson).
    shifts      : (n, 2) in-plane shifts (Å) applied to each projection (stage drift).
    seed        : seeds the noise.
    geometry    : an explicit `TiltGeometry` to use instead of the one built from angles and shifts.
    intensity_scale : (n,) factors on each clean projection before noise (beam-current drift).
    """
    angles = np.asarray(angles_deg, dtype=np.float64).reshape(-1)
    shape = check_image_shape(tuple(shape), "shape")
    if pixel_size <= 0 or not np.isfinite(pixel_size):
        raise InputError("--pixel", f"pixel size must be a positive number of Å, got {pixel_size}")
    if noise < 0 or (peak_counts is not None and peak_counts <= 0):
        raise InputError("--noise", "noise levels must be positive")
    explicit = geometry is not None or shifts is not None
    if geometry is None:
        geometry = TiltGeometry.from_tilt_angles(angles, shifts)
    positions, weights, sigmas = specimen_gaussians(atoms, b_factor)
    clean = ForwardModel(geometry, shape, pixel_size, blur_sigma).render_gaussians(positions, weights, sigmas)
    clean = clean.astype(np.float64)
    if intensity_scale is not None:
        clean *= np.asarray(intensity_scale, np.float64).reshape(-1, 1, 1)
    rng = np.random.default_rng(seed)
    peak = clean.max()
    data = clean
    if peak_counts is not None:
        data = rng.poisson(np.clip(clean, 0, None) * (peak_counts / peak)) * (peak / peak_counts)
    noise_sigma = None
    if noise > 0:
        noise_sigma = noise * peak
        data = data + rng.normal(0.0, noise_sigma, clean.shape)
    return TiltSeries(projections=data.astype(np.float32), angles=angles, pixel_size=float(pixel_size),
                      geometry=geometry if explicit else None, noise_sigma=noise_sigma,
                      blur_sigma=float(blur_sigma), description=description)


def auto_shape(atoms, pixel_size: float, margin: float = 6.0) -> tuple[int, int]:
    """Square image (H, W) whose half-width exceeds every atom's distance from the tilt axis (and
    |y|) by ``margin`` Å, so the particle stays inside at every tilt."""
    p = atoms.positions
    reach = max(np.sqrt(p[:, 0] ** 2 + p[:, 2] ** 2).max(), np.abs(p[:, 1]).max()) + margin
    n = int(2 * np.ceil(reach / pixel_size))
    return n, n
