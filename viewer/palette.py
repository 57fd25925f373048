"""Colours and display sizes of atoms: a CPK-like palette per element, a colour map for fitted
amplitudes, and the colours that mark atoms matched, missed or spurious against a truth.

Colours are RGB floats in 0..1; radii are in Å.
"""

from __future__ import annotations

import colorsys

import numpy as np

from engine.io.atoms import UNKNOWN_SPECIES
from engine.core.elements import ATOMIC_NUMBER
from engine.core.errors import InputError
from engine.physics.structures import nearest_neighbour_distance

_ELEMENT_RGB8 = {
    "H": (255, 255, 255), "C": (144, 144, 144), "N": (48, 80, 248), "O": (255, 13, 13), "F": (144, 224, 80),
    "Na": (171, 92, 242), "Mg": (138, 255, 0), "Al": (191, 166, 166), "Si": (240, 200, 160),
    "P": (255, 128, 0), "S": (255, 255, 48), "Cl": (31, 240, 31), "Ti": (191, 194, 199),
    "V": (166, 166, 171), "Cr": (138, 153, 199), "Mn": (156, 122, 199), "Fe": (224, 102, 51),
    "Co": (240, 144, 160), "Ni": (80, 208, 80), "Cu": (200, 128, 51), "Zn": (125, 128, 176),
    "Ga": (194, 143, 143), "Ge": (102, 143, 143), "Se": (255, 161, 0), "Zr": (148, 224, 224),
    "Nb": (115, 194, 201), "Mo": (84, 181, 181), "Ru": (36, 143, 143), "Rh": (10, 125, 140),
    "Pd": (0, 105, 133), "Ag": (192, 192, 192), "Cd": (255, 217, 143), "In": (166, 117, 115),
    "Sn": (102, 128, 128), "Sb": (158, 99, 181), "Te": (212, 122, 0), "Hf": (77, 194, 255),
    "Ta": (77, 166, 255), "W": (33, 148, 214), "Re": (38, 125, 171), "Os": (38, 102, 150),
    "Ir": (23, 84, 135), "Pt": (208, 208, 224), "Au": (255, 209, 35), "Pb": (87, 89, 97),
    "Bi": (158, 79, 181),
}
"""CPK/Jmol-style colours (0..255) of the elements common in atomic electron tomography."""

UNKNOWN_COLOUR = (0.72, 0.74, 0.80)
"""Atoms of unknown species ('X')."""

RADIUS_PER_BOND = 0.2
"""Display radius as a fraction of the element's nearest-neighbour distance (Au: 0.58 Å)."""
DEFAULT_RADIUS = 0.5
"""Å, for atoms with neither a known element nor a fitted width."""
RADIUS_PER_WIDTH = 1.4
"""Display radius per fitted Gaussian width σ, for atoms of unknown species (σ 0.4 Å → 0.56 Å)."""

TRUTH_COLOURS = {"matched": (0.30, 0.80, 0.35), "missed": (0.25, 0.55, 1.00), "spurious": (0.95, 0.25, 0.20)}
"""Against a truth: fitted atoms with a true partner, true atoms nobody found (drawn at their true
positions), fitted atoms with no true partner."""

# Anchors of a perceptually ordered dark-blue → teal → yellow map (after matplotlib's viridis).
_AMPLITUDE_ANCHORS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]) / 255.0


def element_colour(symbol: str) -> tuple[float, float, float]:
    """RGB (0..1) of an element: the CPK-like table, else a hue spread by atomic number (so distinct
    elements stay distinct), UNKNOWN_COLOUR for 'X'. Unknown symbols are an InputError."""
    if symbol == UNKNOWN_SPECIES:
        return UNKNOWN_COLOUR
    if symbol in _ELEMENT_RGB8:
        return tuple(v / 255.0 for v in _ELEMENT_RGB8[symbol])
    if symbol not in ATOMIC_NUMBER:
        raise InputError("species", f"unknown element symbol {symbol!r}")
    hue = (ATOMIC_NUMBER[symbol] * 0.618034) % 1.0  # golden-ratio steps: neighbours in Z get far-apart hues
    return colorsys.hsv_to_rgb(hue, 0.55, 0.9)


def species_colours(species) -> np.ndarray:
    """(N, 3) RGB of each atom's element."""
    table = {s: element_colour(s) for s in set(species)}
    return np.array([table[s] for s in species], dtype=np.float64).reshape(-1, 3)


def element_radius(symbol: str) -> float | None:
    """Display radius (Å) of an element: RADIUS_PER_BOND × its nearest-neighbour distance; None
    when no distance is known for it (or for 'X')."""
    try:
        return RADIUS_PER_BOND * nearest_neighbour_distance(symbol)
    except InputError:
        return None


def atom_radii(species, widths=None) -> np.ndarray:
    """(N,) display radii, Å: from the element where one is known, else RADIUS_PER_WIDTH × the fitted
    width σ (Å) when given, else DEFAULT_RADIUS."""
    species = np.asarray(species)
    table = {s: element_radius(s) for s in set(species.tolist())}
    fallback = (RADIUS_PER_WIDTH * np.asarray(widths, np.float64) if widths is not None
                else np.full(len(species), DEFAULT_RADIUS))
    return np.array([fallback[i] if table[s] is None else table[s] for i, s in enumerate(species)], np.float64)


def amplitude_colours(values, lo: float, hi: float) -> np.ndarray:
    """(N, 3) RGB of ``values`` on the dark-blue → yellow map: ``lo`` and below the darkest, ``hi``
    and above the brightest (all the middle colour when lo == hi)."""
    values = np.asarray(values, np.float64)
    t = np.clip((values - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.full(values.shape, 0.5)
    x = t * (len(_AMPLITUDE_ANCHORS) - 1)
    i = np.minimum(x.astype(int), len(_AMPLITUDE_ANCHORS) - 2)
    f = (x - i)[:, None]
    return (1 - f) * _AMPLITUDE_ANCHORS[i] + f * _AMPLITUDE_ANCHORS[i + 1]


def amplitude_range(values) -> tuple[float, float]:
    """Colour-map range for amplitudes: the 2nd..98th percentile, so one outlier does not flatten
    the rest."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [2, 98])
    return float(lo), float(hi)
