"""Structure builders: cluster counts, distances, orderings, the dev datasets' truth, and recipes."""

from __future__ import annotations


import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist

from engine.io.atoms import Atoms, read_atoms
from engine.core.errors import InputError
from engine.physics.structures import (CRYSTALS, amorphous, build_structure, cuboctahedron, nearest_neighbour_distance,
                               octahedron, order_l10, parse_recipe, random_alloy, rotate, sphere)

from conftest import SHARED_DATA as DATA


def _nn_distances(atoms: Atoms) -> np.ndarray:
    distance, _ = cKDTree(atoms.positions).query(atoms.positions, k=2)
    return distance[:, 1]


def _counts(atoms: Atoms) -> dict[str, int]:
    species, counts = np.unique(atoms.species, return_counts=True)
    return dict(zip(species.tolist(), counts.tolist()))


# ------------------------------------------------------------------------------------ shapes

@pytest.mark.parametrize("length, cutoff, n", [
    (7, 3, 147), (9, 3, 405),  # the two dev datasets (ase.cluster.Octahedron)
    (1, 0, 1), (2, 0, 6), (3, 0, 19), (4, 0, 44), (5, 0, 85), (6, 0, 146),  # octahedral numbers
    (4, 1, 38),  # truncated octahedron
])
def test_octahedron_counts(length, cutoff, n):
    atoms = octahedron("Au", length, cutoff)
    assert len(atoms) == n and set(atoms.species) == {"Au"}
    np.testing.assert_allclose(atoms.positions.mean(axis=0), 0.0, atol=1e-12)


def test_cuboctahedron_magic_numbers():
    assert [len(cuboctahedron("Pt", k)) for k in range(5)] == [1, 13, 55, 147, 309]


@pytest.mark.parametrize("symbol", [s for s, entry in CRYSTALS.items() if entry[0] == "fcc"])
def test_fcc_nearest_neighbours(symbol):
    a = CRYSTALS[symbol][1]
    atoms = cuboctahedron(symbol, 2)
    np.testing.assert_allclose(_nn_distances(atoms), a / np.sqrt(2), rtol=1e-12)
    assert nearest_neighbour_distance(symbol) == pytest.approx(a / np.sqrt(2), rel=1e-12)
    centre = np.argmin(np.linalg.norm(atoms.positions, axis=1))
    assert (np.linalg.norm(atoms.positions - atoms.positions[centre], axis=1) < a / np.sqrt(2) + 1e-6).sum() == 13


@pytest.mark.parametrize("symbol, neighbours", [("Fe", 8), ("W", 8), ("Co", 6), ("Mg", 6), ("Zn", 6)])
def test_bcc_hcp_spheres(symbol, neighbours):
    d = nearest_neighbour_distance(symbol)
    lattice, a, *c = CRYSTALS[symbol]
    # hcp with c/a != ideal: 6 in-plane neighbours at a, 6 out-of-plane ones at sqrt(a²/3 + c²/4)
    shell = [a * np.sqrt(3) / 2] if lattice == "bcc" else [a, np.sqrt(a**2 / 3 + c[0] ** 2 / 4)]
    assert d == pytest.approx(min(shell), rel=1e-12)
    # A sphere just beyond the nearest-neighbour distance holds the central atom and its nearest neighbours,
    # one just beyond the first shell the whole shell (8 in bcc, 12 in hcp).
    assert len(sphere(symbol, d + 0.01, centre=False)) == neighbours + 1
    assert len(sphere(symbol, max(shell) + 0.01, centre=False)) == (9 if lattice == "bcc" else 13)
    big = sphere(symbol, 12.0)
    np.testing.assert_allclose(_nn_distances(big).min(), d, rtol=1e-12)
    np.testing.assert_allclose(big.positions.mean(axis=0), 0.0, atol=1e-12)


def test_sphere_radius_and_lattice_name():
    atoms = sphere("fcc", 9.0, a=4.0, centre=False)
    radii = np.linalg.norm(atoms.positions, axis=1)
    assert radii.max() <= 9.0 + 1e-6 and set(atoms.species) == {"X"}
    # every lattice point inside is kept: the full count of a fcc sphere of radius 9 Å, a = 4 Å
    grid = np.stack(np.meshgrid(*[np.arange(-6, 7)] * 3, indexing="ij"), -1).reshape(-1, 3)
    fcc = grid[grid.sum(axis=1) % 2 == 0] * 2.0
    assert len(atoms) == int((np.linalg.norm(fcc, axis=1) <= 9.0).sum())
    with pytest.raises(InputError, match="give a="):
        sphere("fcc", 5.0)


@pytest.mark.parametrize("lattice, cell, basis", [
    ("fcc", 3.0 * np.eye(3), [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]),
    ("bcc", 3.0 * np.eye(3), [[0, 0, 0], [0.5, 0.5, 0.5]]),
    ("hcp", np.array([[3.0, 0, 0], [-1.5, 1.5 * np.sqrt(3), 0], [0, 0, 5.0]]), [[0, 0, 0], [1 / 3, 2 / 3, 0.5]]),
])
def test_sphere_is_the_whole_lattice_ball(lattice, cell, basis):
    # brute force: every point of a big block of the lattice within 14 Å of the origin atom
    cells = np.stack(np.meshgrid(*[np.arange(-12, 13)] * 3, indexing="ij"), -1).reshape(-1, 1, 3)
    points = ((cells + np.array(basis)) @ cell).reshape(-1, 3)
    expected = points[np.linalg.norm(points, axis=1) <= 14.0 + 1e-6]
    atoms = sphere(lattice, 14.0, a=3.0, c=5.0 if lattice == "hcp" else None, centre=False)
    assert len(atoms) == len(expected)
    assert cKDTree(expected).query(atoms.positions)[0].max() < 1e-9  # same points, hcp in the same orientation


def test_reproduces_dev_truth_files():
    for name, length, cutoff, a, euler in [("dev_au_cubo_small", 7, 3, 4.08, (-52, 28, 139)),
                                           ("dev_ptni_wedge", 9, 3, 3.764, (14, 76, -23))]:
        path = DATA / f"{name}_truth.xyz"
        if not path.exists():
            pytest.skip(f"{path} is not available")
        truth = read_atoms(path)
        built = rotate(octahedron("Au", length, cutoff, a=a).centered(), euler)
        distance = cdist(built.positions, truth.positions)
        rows, cols = linear_sum_assignment(distance)
        assert len(built) == len(truth) and distance[rows, cols].max() < 1e-3


def test_build_structure_matches_dev_recipe():
    atoms = build_structure(parse_recipe("octahedron element=Au length=7 cutoff=3 euler=-52,28,139"))
    direct = rotate(octahedron("Au", 7, 3, a=4.08), (-52, 28, 139))
    np.testing.assert_allclose(atoms.positions, direct.positions, atol=1e-12)
    # rotation keeps distances and the centroid
    np.testing.assert_allclose(_nn_distances(atoms), 4.08 / np.sqrt(2), rtol=1e-12)
    np.testing.assert_allclose(atoms.positions.mean(axis=0), 0.0, atol=1e-12)


# ------------------------------------------------------------------------------------ species

def test_l10_exact_composition_and_alternating_layers():
    a = 3.8
    # a block of 2 x 2 x 2 conventional cells: four (001) planes of eight atoms each
    cells = np.stack(np.meshgrid(*[np.arange(2)] * 3, indexing="ij"), -1).reshape(-1, 1, 3)
    basis = np.array([[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]])
    block = Atoms(["X"] * 32, ((cells + basis) * a).reshape(-1, 3))
    assert _counts(order_l10(block, ("Fe", "Pt"))) == {"Fe": 16, "Pt": 16}

    ordered = order_l10(octahedron("Fe", 9, 3, a=a), ("Fe", "Pt"))
    layers = np.rint(ordered.positions[:, 2] / (a / 2)).astype(int)
    per_layer = [set(ordered.species[layers == k]) for k in range(layers.min(), layers.max() + 1)]
    assert all(len(s) == 1 for s in per_layer)
    assert [s.pop() for s in per_layer] == ["Fe", "Pt"] * (len(per_layer) // 2) + ["Fe"] * (len(per_layer) % 2)
    with pytest.raises(InputError, match="before rotating"):
        order_l10(rotate(octahedron("Fe", 5, a=a), (10, 20, 30)))


@pytest.mark.parametrize("n, composition, expected", [
    (405, {"Pt": 0.6, "Ni": 0.4}, {"Pt": 243, "Ni": 162}),
    (13, {"Au": 1, "Ag": 1, "Cu": 1}, {"Au": 5, "Ag": 4, "Cu": 4}),  # largest remainder, ties to the first
    (10, {"Pd": 0.26, "Rh": 0.74}, {"Pd": 3, "Rh": 7}),
])
def test_random_alloy_exact_counts(n, composition, expected):
    sites = Atoms(["X"] * n, np.arange(3 * n, dtype=float).reshape(n, 3))
    alloy = random_alloy(sites, composition, seed=3)
    assert _counts(alloy) == expected
    np.testing.assert_array_equal(alloy.positions, sites.positions)
    assert alloy.species.tolist() == random_alloy(sites, composition, seed=3).species.tolist()


def test_random_alloy_is_shuffled():
    sites = octahedron("Pt", 9, 3)
    first, second = (random_alloy(sites, {"Pt": 0.5, "Ni": 0.5}, seed=s).species for s in (0, 1))
    assert (first != second).sum() > 100


def test_amorphous_min_distance_and_seed():
    atoms = amorphous("Au", 800, 2.6, radius=17.0, seed=5, centre=False)  # 36 % packing, near jamming
    assert len(atoms) == 800 and set(atoms.species) == {"Au"}
    assert _nn_distances(atoms).min() >= 2.6
    assert np.linalg.norm(atoms.positions, axis=1).max() <= 17.0
    again = amorphous("Au", 800, 2.6, radius=17.0, seed=5, centre=False)
    np.testing.assert_array_equal(again.positions, atoms.positions)
    other = amorphous("Au", 800, 2.6, radius=17.0, seed=6)
    assert not np.allclose(other.positions, atoms.positions)
    np.testing.assert_allclose(other.positions.mean(axis=0), 0.0, atol=1e-10)
    dense = amorphous("Au", 500, 2.5, density=0.02, seed=0, centre=False)
    radius = (3 * 500 / (4 * np.pi * 0.02)) ** (1 / 3)
    assert _nn_distances(dense).min() >= 2.5 and np.linalg.norm(dense.positions, axis=1).max() <= radius
    with pytest.raises(InputError, match="jams"):
        amorphous("Au", 1000, 3.0, radius=10.0)


def test_vegard_and_alloy_recipes():
    atoms = build_structure(parse_recipe("octahedron species=Pt:0.6,Ni:0.4 ordering=random length=9 cutoff=3"))
    assert len(atoms) == 405 and _counts(atoms) == {"Pt": 243, "Ni": 162}
    a = 0.6 * CRYSTALS["Pt"][1] + 0.4 * CRYSTALS["Ni"][1]
    np.testing.assert_allclose(_nn_distances(atoms), a / np.sqrt(2), rtol=1e-12)
    l10 = build_structure({"kind": "cuboctahedron", "species": {"Fe": 0.5, "Pt": 0.5}, "ordering": "l10",
                           "shells": 3, "a": 3.8})
    assert _counts(l10) == _counts(order_l10(cuboctahedron("X", 3, a=3.8), ("Fe", "Pt")))
    seeded = [build_structure({"kind": "amorphous", "species": {"Cu": 0.5, "Ag": 0.5}, "n_atoms": 60,
                               "min_distance": 2.4}, seed=s) for s in (1, 1, 2)]
    assert _counts(seeded[0]) == {"Cu": 30, "Ag": 30}
    np.testing.assert_array_equal(seeded[0].positions, seeded[1].positions)
    assert not np.allclose(seeded[0].positions, seeded[2].positions)


# ------------------------------------------------------------------------------------ recipes

def test_parse_recipe():
    assert parse_recipe("octahedron element=Au length=7 cutoff=3 euler=-52,28,139") == {
        "kind": "octahedron", "element": "Au", "length": 7, "cutoff": 3, "euler": [-52, 28, 139]}
    recipe = parse_recipe("amorphous species=Pt:0.6,Ni:0.4 n_atoms=50 min_distance=2.5 centre=false")
    assert recipe == {"kind": "amorphous", "species": {"Pt": 0.6, "Ni": 0.4}, "n_atoms": 50,
                      "min_distance": 2.5, "centre": False}
    assert isinstance(recipe["n_atoms"], int) and isinstance(recipe["min_distance"], float)


@pytest.mark.parametrize("text, problem", [
    ("", "empty structure recipe"),
    ("octahedron element=Au length", "expected key=value, got 'length'"),
    ("octahedron element=Au length=", "expected key=value"),
    ("octahedron length=7 length=8", "'length' given twice"),
    ("octahedron species=Pt0.6,Ni:0.4 length=7", "element:fraction pairs"),
    ("octahedron species=Pt:x length=7", "element:fraction pairs"),
    ("octahedron euler=1,,2 length=7", "empty item"),
])
def test_parse_recipe_errors(text, problem):
    with pytest.raises(InputError) as err:
        parse_recipe(text)
    assert err.value.source == "--build" and problem in err.value.problem


@pytest.mark.parametrize("recipe, problem", [
    ({"kind": "octahedron", "element": "Au", "length": 7, "foo": 1},
     "unknown key 'foo' for octahedron (known: a, centre, cutoff, element, euler, kind, length, ordering, species)"),
    ({"kind": "sphere", "element": "Au", "radius": 5, "length": 3}, "unknown key 'length'"),
    ({"kind": "cube", "element": "Au"}, "unknown kind 'cube' (known: amorphous, cuboctahedron, octahedron, sphere)"),
    ({"kind": "octahedron", "element": "Au"}, "octahedron needs 'length'"),
    ({"kind": "sphere", "radius": 5}, "exactly one of 'element' or 'species'"),
    ({"kind": "sphere", "element": "Au", "ordering": "l10", "radius": 5}, "'ordering' applies to 'species'"),
    ({"kind": "sphere", "species": {"Au": 1}, "ordering": "b2", "radius": 5}, "unknown ordering 'b2'"),
    ({"kind": "octahedron", "species": {"Pt": 0.5, "Fe": 0.5}, "length": 5}, "Vegard"),
    ({"kind": "octahedron", "species": {"Pt": 0.6, "Ni": 0.4}, "ordering": "l10", "length": 5}, "50/50"),
    ({"kind": "amorphous", "species": {"Pt": 0.5, "Ni": 0.5}, "ordering": "l10", "n_atoms": 5,
      "min_distance": 2}, "needs an fcc lattice"),
])
def test_build_structure_recipe_errors(recipe, problem):
    with pytest.raises(InputError) as err:
        build_structure(recipe)
    assert err.value.source == "structure recipe" and problem in err.value.problem


@pytest.mark.parametrize("call, source, problem", [
    (lambda: octahedron("Fe", 5), "octahedron", "no lattice constant for fcc Fe (Fe is bcc in CRYSTALS); give a="),
    (lambda: octahedron("Au", 3, cutoff=2), "octahedron", "length must be >= 2*cutoff + 1 = 5"),
    (lambda: cuboctahedron("Au", 1.5), "cuboctahedron", "shells must be an integer"),
    (lambda: sphere("Qq", 5), "sphere", "unknown element symbol 'Qq'"),
    (lambda: sphere("Au", -1), "sphere", "radius must be a positive number"),
    (lambda: nearest_neighbour_distance("Cf"), "nearest_neighbour_distance", "no lattice or radius known for Cf"),
    (lambda: random_alloy(octahedron("Au", 3), {"Au": -1}, 0), "composition", "must be a number >= 0"),
    (lambda: rotate(octahedron("Au", 3), (1, 2)), "euler", "three finite ZYZ Euler angles"),
])
def test_builder_errors(call, source, problem):
    with pytest.raises(InputError) as err:
        call()
    assert err.value.source == source and problem in err.value.problem
