"""Nanoparticle builders for tests and simulated scenes.

The crystalline shapes come from ASE: spheres are cut from `ase.build.bulk` lattices (fcc, bcc,
hcp), octahedra and cuboctahedra are `ase.cluster.Octahedron`. Amorphous particles (random
sequential addition with a minimum distance) have no ASE builder and are made here with k-d trees.
Every builder returns an `Atoms` with the centroid at the origin (unless ``centre=False``) and is
deterministic for a given seed. `build_structure` turns a recipe (dict, or the CLI text form read
by `parse_recipe`) into a particle: shape, species or alloy ordering, lattice constant, Euler
orientation.
"""

from __future__ import annotations

import numpy as np
from ase.build import bulk
from ase.cluster import Octahedron
from scipy.spatial import cKDTree

from engine.io.atoms import UNKNOWN_SPECIES, Atoms
from engine.core.elements import normalize_symbol
from engine.core.errors import InputError
from engine.core.geometry import euler_zyz

CRYSTALS: dict[str, tuple] = {
    # fcc: (lattice, a [Å])
    "Au": ("fcc", 4.08), "Ag": ("fcc", 4.09), "Cu": ("fcc", 3.61), "Pt": ("fcc", 3.92),
    "Pd": ("fcc", 3.89), "Ni": ("fcc", 3.52), "Al": ("fcc", 4.05), "Ir": ("fcc", 3.84),
    "Rh": ("fcc", 3.80), "Pb": ("fcc", 4.95),
    # bcc: (lattice, a [Å])
    "Fe": ("bcc", 2.87), "W": ("bcc", 3.16), "Mo": ("bcc", 3.15), "Cr": ("bcc", 2.88),
    "V": ("bcc", 3.03), "Nb": ("bcc", 3.30), "Ta": ("bcc", 3.30),
    # hcp: (lattice, a [Å], c [Å])
    "Co": ("hcp", 2.51, 4.07), "Ti": ("hcp", 2.95, 4.68), "Mg": ("hcp", 3.21, 5.21),
    "Zn": ("hcp", 2.66, 4.95), "Zr": ("hcp", 3.23, 5.15), "Ru": ("hcp", 2.71, 4.28),
    "Re": ("hcp", 2.76, 4.46), "Os": ("hcp", 2.74, 4.32),
}
"""Room-temperature crystal structures and lattice constants of common metals (Kittel, *Introduction
to Solid State Physics*, 8th ed., ch. 1): element -> ('fcc' | 'bcc', a) or ('hcp', a, c), in Å."""

COVALENT_RADII = {
    "H": 0.31, "C": 0.76, "N": 0.71, "O": 0.66, "Si": 1.11, "P": 1.07, "S": 1.05, "Ga": 1.22,
    "Ge": 1.20, "Se": 1.20, "Cd": 1.44, "In": 1.42, "Sn": 1.39, "Sb": 1.39, "Te": 1.38, "Bi": 1.48,
}
"""Covalent radii [Å] (Cordero et al., Dalton Trans. 2008) for elements without a `CRYSTALS` entry;
twice the radius estimates the nearest-neighbour distance."""

LATTICES = ("fcc", "bcc", "hcp")

# RSA of hard spheres jams at a volume fraction of about 0.38 (Feder 1980); refuse to try beyond it.
_RSA_JAMMING_FRACTION = 0.38
_DEFAULT_PACKING_FRACTION = 0.25


def _symbol(symbol: str, source: str) -> str:
    """A validated element symbol, or 'X' for an unknown species."""
    return UNKNOWN_SPECIES if symbol.strip().upper() == UNKNOWN_SPECIES else normalize_symbol(symbol, source)


def _crystal(symbol: str, lattice: str | None, a: float | None, c: float | None,
             source: str) -> tuple[str, float, float | None]:
    """(lattice, a, c) for ``symbol``: given values win, missing ones come from `CRYSTALS`.

    hcp without a known c uses the ideal c = a·√(8/3).
    """
    table = CRYSTALS.get(symbol)
    if lattice is not None and lattice not in LATTICES:
        raise InputError(source, f"unknown lattice {lattice!r} (known: {', '.join(LATTICES)})")
    same = table is not None and (lattice is None or lattice == table[0])
    lattice = lattice or (table[0] if table else None)
    if lattice is None:
        raise InputError(source, f"no lattice known for {symbol}; give the lattice ({', '.join(LATTICES)}) and a= in Å")
    if a is None:
        if not same:
            why = f"{symbol} is {table[0]} in CRYSTALS" if table else f"{symbol} is not in CRYSTALS"
            raise InputError(source, f"no lattice constant for {lattice} {symbol} ({why}); give a= in Å")
        a = table[1]
    a = _positive(a, "a", source)
    if lattice == "hcp":
        c = _positive(c, "c", source) if c is not None else (table[2] if same else a * np.sqrt(8 / 3))
    return lattice, a, c


def _positive(value, name: str, source: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(source, f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise InputError(source, f"{name} must be a positive number, got {value!r}")
    return value


def _integer(value, name: str, source: str, minimum: int) -> int:
    whole = isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole:
        raise InputError(source, f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise InputError(source, f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


BYTES_PER_ATOM = 2000
"""Memory an atom takes while a structure is built and simulated (ASE's build, five Gaussians per
atom in the simulator, their copies): generous, for the check before building."""


def _require_size(n_atoms: float, source: str, what: str) -> None:
    """Refuse, before building, a structure of about ``n_atoms`` atoms that would not fit in memory."""
    from engine.core.memory import require_memory

    require_memory(n_atoms * BYTES_PER_ATOM, source, f"{what} makes up to {n_atoms:,.0f} atoms, which",
                   "build a smaller structure")


def _finish(symbol: str, positions: np.ndarray, centre: bool) -> Atoms:
    atoms = Atoms(np.full(len(positions), symbol), positions)
    return atoms.centered() if centre else atoms


def nearest_neighbour_distance(symbol: str) -> float:
    """
    Nearest-neighbour distance of an element [Å].

    From `CRYSTALS`: a/√2 (fcc), a·√3/2 (bcc), min(a, √(a²/3 + c²/4)) (hcp); otherwise twice the
    covalent radius in `COVALENT_RADII`.

    Parameters
    ----------
    symbol : str
        Element symbol.

    Returns
    -------
    float
        Distance [Å].
    """
    symbol = normalize_symbol(symbol, "nearest_neighbour_distance")
    if symbol in CRYSTALS:
        lattice, a, *c = CRYSTALS[symbol]
        if lattice == "fcc":
            return a / np.sqrt(2)
        if lattice == "bcc":
            return a * np.sqrt(3) / 2
        return min(a, np.sqrt(a**2 / 3 + c[0] ** 2 / 4))
    if symbol in COVALENT_RADII:
        return 2 * COVALENT_RADII[symbol]
    raise InputError("nearest_neighbour_distance", f"no lattice or radius known for {symbol} "
                                                   f"(known: {', '.join(sorted(CRYSTALS) + sorted(COVALENT_RADII))})")


def sphere(element_or_lattice: str, radius: float, lattice: str | None = None, a: float | None = None,
           c: float | None = None, centre: bool = True) -> Atoms:
    """
    Spherical cluster: the fcc, bcc or hcp lattice points within ``radius`` of a lattice point.

    The lattice is `ase.build.bulk`'s cell (cubic for fcc and bcc; for hcp the primitive one, a
    along x, c along z, the second atom at (0, a/√3, c/2)), repeated to cover the sphere around one
    of its corner atoms.

    Parameters
    ----------
    element_or_lattice : str
        Element symbol ('Au'; lattice and constants from `CRYSTALS`) or a lattice name ('fcc',
        'bcc', 'hcp'; species 'X', ``a`` required).
    radius : float
        Sphere radius [Å]; points up to radius + 1e-6 Å are kept.
    lattice : str, optional
        Overrides the element's lattice ('fcc', 'bcc', 'hcp'); then ``a`` is required.
    a : float, optional
        Lattice constant [Å].
    c : float, optional
        hcp c [Å]; default from `CRYSTALS`, else ideal a·√(8/3).
    centre : bool
        Translate the centroid to the origin (default); False keeps the central atom at the origin.

    Returns
    -------
    Atoms
    """
    source = "sphere"
    if element_or_lattice.lower() in LATTICES:
        if lattice is not None and lattice != element_or_lattice.lower():
            raise InputError(source, f"lattice given twice: {element_or_lattice!r} and {lattice!r}")
        symbol, lattice = UNKNOWN_SPECIES, element_or_lattice.lower()
    else:
        symbol = _symbol(element_or_lattice, source)
    lattice, a, c = _crystal(symbol, lattice, a, c, source)
    radius = _positive(radius, "radius", source)
    _require_size(4 / 3 * np.pi * (radius + a) ** 3 * 8 / a**3, source, f"radius={radius:g}")
    unit = bulk(symbol, lattice, a=a, c=c, cubic=lattice != "hcp")  # an atom at the origin
    cell = unit.cell.array
    # cells each way so that every point within radius of the middle cell's origin atom is in the block
    half = np.ceil(radius * np.linalg.norm(np.linalg.inv(cell), axis=0)).astype(int) + 1
    points = unit.repeat(tuple(2 * half + 1)).positions - half @ cell
    return _finish(symbol, points[np.linalg.norm(points, axis=1) <= radius + 1e-6], centre)


def octahedron(element: str, length: int, cutoff: int = 0, a: float | None = None,
               centre: bool = True) -> Atoms:
    """
    fcc octahedron, truncated octahedron or cuboctahedron: ``ase.cluster.Octahedron``.

    The full octahedron has ``length`` atoms along each edge; ``cutoff`` layers are removed at each
    of its six vertices by (100) facets. cutoff=0: octahedron; length = 2·cutoff + 1:
    cuboctahedron; in between: truncated octahedron (regular for length = 3·cutoff + 1).
    E.g. length=7, cutoff=3: 147 atoms; length=9, cutoff=3: 405 atoms.

    Parameters
    ----------
    element : str
        Element symbol, or 'X' (then ``a`` is required).
    length : int
        Atoms per edge of the full octahedron, >= 1.
    cutoff : int
        Atoms removed from each vertex, 0 <= cutoff <= (length - 1) / 2.
    a : float, optional
        fcc lattice constant [Å]; default from `CRYSTALS` for fcc elements.
    centre : bool
        Translate the centroid to the origin (default); False keeps the octahedron's centre (an atom
        for odd length, an octahedral interstice for even length) at the origin. The two agree.

    Returns
    -------
    Atoms
        Cubic axes along x, y, z.
    """
    source = "octahedron"
    symbol = _symbol(element, source)
    _, a, _ = _crystal(symbol, "fcc", a, None, source)
    length = _integer(length, "length", source, 1)
    cutoff = _integer(cutoff, "cutoff", source, 0)
    if length < 2 * cutoff + 1:
        raise InputError(source, f"length must be >= 2*cutoff + 1 = {2 * cutoff + 1}, got {length}")
    _require_size((2 * length**3 + length) / 3, source, f"length={length}")
    cluster = Octahedron(symbol, length=length, cutoff=cutoff, latticeconstant=a)  # centred on the origin
    return _finish(symbol, cluster.positions, centre)


def cuboctahedron(element: str, shells: int, a: float | None = None, centre: bool = True) -> Atoms:
    """
    Magic-number fcc cuboctahedron: a central atom and ``shells`` closed shells.

    Sizes 1, 13, 55, 147, 309, ... atoms for shells 0, 1, 2, 3, 4, ...; it is
    `octahedron(element, 2·shells + 1, shells)`.

    Parameters
    ----------
    element : str
        Element symbol, or 'X' (then ``a`` is required).
    shells : int
        Number of shells around the central atom, >= 0.
    a : float, optional
        fcc lattice constant [Å]; default from `CRYSTALS`.
    centre : bool
        Translate the centroid to the origin (it is the central atom either way).

    Returns
    -------
    Atoms
    """
    shells = _integer(shells, "shells", "cuboctahedron", 0)
    return octahedron(element, 2 * shells + 1, shells, a=a, centre=centre)


def order_l10(atoms: Atoms, species: tuple[str, str] = ("Fe", "Pt")) -> Atoms:
    """
    L1₀ chemical order: alternate (001) planes get the first and the second species.

    Apply to an unrotated fcc cluster (cubic axes along x, y, z): the planes are found from the z
    coordinates, evenly spaced a/2 apart. The lowest plane gets ``species[0]``.

    Parameters
    ----------
    atoms : Atoms
        Unrotated fcc cluster; positions [Å].
    species : tuple of two str
        The two element symbols.

    Returns
    -------
    Atoms
        A copy with the new species.
    """
    source = "order_l10"
    if len(species) != 2:
        raise InputError(source, f"L1_0 needs exactly two species, got {list(species)}")
    first, second = (_symbol(s, source) for s in species)
    if first == second:
        raise InputError(source, f"L1_0 needs two different species, got {first} twice")
    z = atoms.positions[:, 2]
    tol = 1e-3  # Å; lattice positions are exact to ~1e-12 Å, rotated ones are off by far more
    gaps = np.diff(np.sort(z))
    gaps = gaps[gaps > tol]
    spacing = gaps.min() if len(gaps) else 1.0
    layer = np.rint((z - z.min()) / spacing)
    if np.any(np.abs(z - z.min() - layer * spacing) > tol):
        raise InputError(source, "atoms do not lie on evenly spaced (001) planes; order the cluster before rotating it")
    out = atoms.copy()
    out.species = np.where(layer.astype(np.int64) % 2 == 0, first, second)
    return out


def random_alloy(atoms: Atoms, composition: dict[str, float], seed=0) -> Atoms:
    """
    Random site occupancy with exact species counts.

    Counts are the fractions times N rounded by largest remainder, so they always sum to N; the
    species are then shuffled over the sites.

    Parameters
    ----------
    atoms : Atoms
        Sites; positions [Å] are kept.
    composition : dict of str to float
        Element -> fraction (normalised to sum 1), e.g. {'Pt': 0.6, 'Ni': 0.4}.
    seed : int or np.random.Generator
        Random seed or generator.

    Returns
    -------
    Atoms
        A copy with the new species.
    """
    symbols, fractions = _composition(composition, "composition")
    raw = fractions * len(atoms)
    counts = np.floor(raw).astype(np.int64)
    # hand the leftover atoms to the largest remainders (ties: first listed)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: len(atoms) - counts.sum()]] += 1
    out = atoms.copy()
    out.species = np.random.default_rng(seed).permutation(np.repeat(symbols, counts))
    return out


def _composition(composition: dict[str, float], source: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated symbols and fractions normalised to sum 1."""
    if not isinstance(composition, dict) or not composition:
        raise InputError(source, f"composition must be a non-empty dict element -> fraction, got {composition!r}")
    symbols = [normalize_symbol(s, source) for s in composition]
    if len(set(symbols)) != len(symbols):
        raise InputError(source, f"an element is listed twice in {composition!r}")
    fractions = np.array([_nonnegative(f, s, source) for s, f in composition.items()])
    if fractions.sum() <= 0:
        raise InputError(source, f"fractions must not all be zero: {composition!r}")
    return np.array(symbols), fractions / fractions.sum()


def _nonnegative(value, name: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
            or not np.isfinite(value) or value < 0:
        raise InputError(source, f"fraction of {name} must be a number >= 0, got {value!r}")
    return float(value)


def amorphous(element: str, n_atoms: int, min_distance: float, radius: float | None = None,
              density: float | None = None, seed=0, centre: bool = True) -> Atoms:
    """
    Amorphous particle: random sequential addition of points in a sphere, no two closer than
    ``min_distance``.

    Candidates are drawn uniformly in the sphere in batches; each is accepted if it keeps
    ``min_distance`` to all accepted points and to the earlier accepted candidates of its batch
    (k-d trees, so the cost is O(N log N)).

    Parameters
    ----------
    element : str
        Element symbol, or 'X'.
    n_atoms : int
        Number of atoms, >= 1.
    min_distance : float
        Minimum distance between atom centres [Å].
    radius : float, optional
        Radius of the sphere holding the atom centres [Å].
    density : float, optional
        Number density [atoms/Å³]; sets radius = (3 N / (4π ρ))^(1/3). Give radius or density, not
        both; with neither the spheres of diameter ``min_distance`` fill 25 % of the volume.
    seed : int or np.random.Generator
        Random seed or generator.
    centre : bool
        Translate the centroid to the origin (default); False keeps the sphere's centre there.

    Returns
    -------
    Atoms
    """
    source = "amorphous"
    symbol = _symbol(element, source)
    n_atoms = _integer(n_atoms, "n_atoms", source, 1)
    _require_size(n_atoms, source, f"n_atoms={n_atoms}")
    min_distance = _positive(min_distance, "min_distance", source)
    if radius is not None and density is not None:
        raise InputError(source, "give radius or density, not both")
    if density is not None:
        radius = (3 * n_atoms / (4 * np.pi * _positive(density, "density", source))) ** (1 / 3)
    elif radius is None:
        radius = min_distance / 2 * (n_atoms / _DEFAULT_PACKING_FRACTION) ** (1 / 3)
    radius = _positive(radius, "radius", source)
    fraction = n_atoms * (min_distance / 2) ** 3 / radius**3
    if n_atoms > 1 and fraction > _RSA_JAMMING_FRACTION:
        raise InputError(source, f"{n_atoms} atoms {min_distance} Å apart fill {fraction:.2f} of a sphere of radius "
                                 f"{radius:.3g} Å; random addition jams near {_RSA_JAMMING_FRACTION}: "
                                 "use a larger radius, a lower density or a smaller min_distance")
    rng = np.random.default_rng(seed)
    placed = np.empty((0, 3))
    drawn, max_drawn = 0, 1000 * n_atoms + 100_000
    while len(placed) < n_atoms:
        if drawn > max_drawn:
            raise InputError(source, f"placed only {len(placed)} of {n_atoms} atoms after {drawn} random trials; "
                                     "use a larger radius or a smaller min_distance")
        need = n_atoms - len(placed)
        batch = max(4 * need, 1024)
        drawn += batch
        # uniform in the ball: isotropic direction, radius ~ R·u^(1/3)
        direction = rng.normal(size=(batch, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        candidates = direction * (radius * rng.random(batch) ** (1 / 3))[:, None]
        if len(placed):
            distance, _ = cKDTree(placed).query(candidates, distance_upper_bound=min_distance)
            candidates = candidates[distance >= min_distance]
        pairs = cKDTree(candidates).query_pairs(min_distance, output_type="ndarray")
        keep = np.ones(len(candidates), dtype=bool)
        # greedy in draw order: pairs sorted by their first index, so keep[i] is final when read
        for i, j in pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]:
            if keep[i]:
                keep[j] = False
        placed = np.vstack([placed, candidates[keep][:need]])
    return _finish(symbol, placed, centre)


def rotate(atoms: Atoms, euler_zyz_deg) -> Atoms:
    """
    Rotate actively about the origin by ZYZ Euler angles: r' = R_z(α) R_y(β) R_z(γ) r.

    Parameters
    ----------
    atoms : Atoms
        Positions [Å].
    euler_zyz_deg : sequence of 3 float
        (α, β, γ) [degrees], see `engine.core.geometry.euler_zyz`.

    Returns
    -------
    Atoms
        A rotated copy.
    """
    try:
        angles = np.asarray(euler_zyz_deg, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        angles = np.full(1, np.nan)
    if angles.shape != (3,) or not np.all(np.isfinite(angles)):
        raise InputError("euler", f"need three finite ZYZ Euler angles in degrees, got {euler_zyz_deg!r}")
    out = atoms.copy()
    out.positions = out.positions @ euler_zyz(*angles).T
    return out


def centre(atoms: Atoms) -> Atoms:
    """
    Translate the centroid (unweighted mean position) to the origin.

    Parameters
    ----------
    atoms : Atoms
        Positions [Å].

    Returns
    -------
    Atoms
        A translated copy.
    """
    return atoms.centered()


# ----------------------------------------------------------------------------------------- recipes

RECIPE_SOURCE = "structure recipe"
_COMMON_KEYS = ("kind", "element", "species", "ordering", "a", "euler", "centre")
_SIZE_KEYS = {
    "sphere": ("radius", "lattice", "c"),
    "octahedron": ("length", "cutoff"),
    "cuboctahedron": ("shells",),
    "amorphous": ("n_atoms", "min_distance", "radius", "density"),
}
_REQUIRED = {"sphere": ("radius",), "octahedron": ("length",), "cuboctahedron": ("shells",),
             "amorphous": ("n_atoms", "min_distance")}
ORDERINGS = ("random", "l10")


def _vegard(symbols, fractions, lattice: str | None) -> tuple[str, float, float | None]:
    """(lattice, a, c) of an alloy by Vegard's law: fraction-weighted mean of the elements' a (and c)."""
    lattices = {CRYSTALS[s][0] if s in CRYSTALS else None for s in symbols}
    target = lattice or (lattices.pop() if len(lattices) == 1 else None)
    missing = [s for s in symbols if s not in CRYSTALS or CRYSTALS[s][0] != target]
    if target is None or missing:
        raise InputError(RECIPE_SOURCE, f"cannot apply Vegard's law to {', '.join(symbols)}: "
                                        f"{', '.join(missing or symbols)} not {target or 'one lattice'} in "
                                        "CRYSTALS; give a= in Å (and lattice= for a sphere)")
    a = float(np.dot(fractions, [CRYSTALS[s][1] for s in symbols]))
    c = float(np.dot(fractions, [CRYSTALS[s][2] for s in symbols])) if target == "hcp" else None
    return target, a, c


def build_structure(recipe: dict, seed=0) -> Atoms:
    """
    Build a particle from a recipe.

    Keys: 'kind' ('sphere' | 'octahedron' | 'cuboctahedron' | 'amorphous'); exactly one of
    'element' ('Au') or 'species' ({'Pt': 0.6, 'Ni': 0.4}, with 'ordering' 'random' (default) or
    'l10' for two species 50/50 on fcc); size keys per kind: sphere 'radius' [Å] (optional
    'lattice', 'c' [Å]), octahedron 'length' (optional 'cutoff'), cuboctahedron 'shells',
    amorphous 'n_atoms', 'min_distance' [Å] (optional 'radius' [Å] or 'density' [atoms/Å³]);
    'a' lattice constant [Å] (default from `CRYSTALS`, for alloys Vegard's law over the
    composition); 'euler' (α, β, γ) ZYZ [degrees] (default (0, 0, 0)); 'centre' (default True).
    The particle is built, centred, given its species (ordering uses the unrotated lattice) and then
    rotated about the origin.

    Parameters
    ----------
    recipe : dict
        The recipe, e.g. {'kind': 'octahedron', 'element': 'Au', 'length': 7, 'cutoff': 3,
        'euler': [-52, 28, 139]}.
    seed : int or np.random.Generator
        Seed for random occupancy and amorphous placement.

    Returns
    -------
    Atoms
    """
    if not isinstance(recipe, dict):
        raise InputError(RECIPE_SOURCE, f"expected a dict of key: value, got {type(recipe).__name__}")
    kind = recipe.get("kind")
    if kind not in _SIZE_KEYS:
        raise InputError(RECIPE_SOURCE, f"unknown kind {kind!r} (known: {', '.join(sorted(_SIZE_KEYS))})")
    known = _COMMON_KEYS + _SIZE_KEYS[kind]
    for key in recipe:
        if key not in known:
            raise InputError(RECIPE_SOURCE, f"unknown key {key!r} for {kind} (known: {', '.join(sorted(known))})")
    for key in _REQUIRED[kind]:
        if key not in recipe:
            raise InputError(RECIPE_SOURCE, f"{kind} needs {key!r}")
    if ("element" in recipe) == ("species" in recipe):
        raise InputError(RECIPE_SOURCE, "give exactly one of 'element' or 'species'")
    if "ordering" in recipe and "species" not in recipe:
        raise InputError(RECIPE_SOURCE, "'ordering' applies to 'species' (an alloy), not to 'element'")
    ordering = recipe.get("ordering", "random")
    if ordering not in ORDERINGS:
        raise InputError(RECIPE_SOURCE, f"unknown ordering {ordering!r} (known: {', '.join(ORDERINGS)})")
    centred = recipe.get("centre", True)
    if not isinstance(centred, bool):
        raise InputError(RECIPE_SOURCE, f"'centre' must be true or false, got {centred!r}")

    get = recipe.get
    a = get("a")
    if "species" in recipe:
        symbols, fractions = _composition(recipe["species"], RECIPE_SOURCE)
        symbol, c = UNKNOWN_SPECIES, get("c")
        lattice = "fcc" if kind in ("octahedron", "cuboctahedron") else get("lattice")
        if kind != "amorphous" and (a is None or lattice is None):
            lattice, vegard_a, vegard_c = _vegard(symbols, fractions, lattice)
            a = vegard_a if a is None else a
            c = vegard_c if c is None else c
        if ordering == "l10":
            if kind == "amorphous" or lattice != "fcc":
                raise InputError(RECIPE_SOURCE, "ordering 'l10' needs an fcc lattice")
            if len(symbols) != 2 or not np.allclose(fractions, 0.5):
                raise InputError(RECIPE_SOURCE, f"ordering 'l10' needs two species at 50/50, got {recipe['species']!r}")
    else:
        symbol, lattice, c = recipe["element"], get("lattice"), get("c")
        if not isinstance(symbol, str):
            raise InputError(RECIPE_SOURCE, f"'element' must be an element symbol, got {symbol!r}")

    rng = np.random.default_rng(seed)
    if kind == "sphere":
        atoms = sphere(symbol, recipe["radius"], lattice=lattice, a=a, c=c, centre=centred)
    elif kind == "octahedron":
        atoms = octahedron(symbol, recipe["length"], get("cutoff", 0), a=a, centre=centred)
    elif kind == "cuboctahedron":
        atoms = cuboctahedron(symbol, recipe["shells"], a=a, centre=centred)
    else:
        atoms = amorphous(symbol, recipe["n_atoms"], recipe["min_distance"], radius=get("radius"),
                          density=get("density"), seed=rng, centre=centred)

    if "species" in recipe:
        if ordering == "l10":
            atoms = order_l10(atoms, tuple(symbols))
        else:
            atoms = random_alloy(atoms, dict(zip(symbols, fractions)), seed=rng)
    return rotate(atoms, get("euler", (0.0, 0.0, 0.0)))


def _scalar(text: str):
    """'7' -> 7, '2.5' -> 2.5, 'true'/'false' -> bool, anything else stays a string."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_recipe(text: str) -> dict:
    """
    Parse the CLI form of a structure recipe.

    "KIND key=value ..." where a value is a number (int or float), true/false, a comma list
    ('euler=-52,28,139' -> [-52, 28, 139]) or a word; 'species' takes element:fraction pairs
    ('species=Pt:0.6,Ni:0.4' -> {'Pt': 0.6, 'Ni': 0.4}). E.g.
    "octahedron element=Au length=7 cutoff=3 euler=-52,28,139". Keys are checked by
    `build_structure`.

    Parameters
    ----------
    text : str
        The recipe text (lengths in Å, angles in degrees).

    Returns
    -------
    dict
    """
    source = "--build"
    tokens = text.split()
    if not tokens:
        raise InputError(source, "empty structure recipe (expected e.g. 'octahedron element=Au length=7 cutoff=3')")
    recipe = {}
    if "=" not in tokens[0]:
        recipe["kind"] = tokens.pop(0)
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not key or not value:
            raise InputError(source, f"expected key=value, got {token!r}")
        if key in recipe:
            raise InputError(source, f"{key!r} given twice")
        items = value.split(",")
        if "" in items:
            raise InputError(source, f"empty item in the list {token!r}")
        if key == "species":
            recipe[key] = {}
            for item in items:
                symbol, colon, fraction = item.partition(":")
                fraction = _scalar(fraction)
                if not colon or not symbol or isinstance(fraction, (bool, str)) or symbol in recipe[key]:
                    raise InputError(source, f"species must be element:fraction pairs like Pt:0.6,Ni:0.4, got {value!r}")
                recipe[key][symbol] = fraction
        else:
            recipe[key] = [_scalar(item) for item in items] if len(items) > 1 else _scalar(value)
    return recipe
