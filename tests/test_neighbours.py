"""The cell-list neighbour grid against brute force: NumPy float64 distances between the same float32
points, minimum image in periodic boxes.

Every grid uses one cutoff and the clouds are scaled instead, so each backend compiles few grids.
"""

import numpy as np
import pytest
import taichi as ti

from engine.core.backend import session_cache
from engine.kernels.neighbours import NeighbourGrid

CUTOFF = 2.4  # Å
# 1, 2 and 9 cells: along x and y, 1.7 and 2.5 cutoffs wide, a point's 27 neighbour cells repeat.
BOX = (4.0, 6.0, 24.0)


def grid(box=None) -> NeighbourGrid:
    """One grid per box and backend, large enough for every cloud but `test_capacity_growth`'s:
    each new capacity compiles the kernels again."""
    cache = session_cache()
    key = ("test_neighbours", box)
    if key not in cache:
        cache[key] = NeighbourGrid(CUTOFF, capacity=2048, box=box)
    return cache[key]


def positions_field(points):
    """A device Vector(3) field holding ``points`` (Å), reused per capacity like the engine's."""
    capacity = 1 << (len(points) - 1).bit_length()
    cache = session_cache()
    key = ("test_neighbours_field", capacity)
    if key not in cache:
        cache[key] = (ti.Vector.field(3, ti.f32, capacity), ti.Vector.field(3, ti.f32, capacity))
    pos, grad = cache[key]
    padded = np.zeros((capacity, 3), np.float32)
    padded[: len(points)] = points
    pos.from_numpy(padded)
    return pos, grad


def distances(a, b, box=None):
    """|b[j] − a[i]| for all i, j (float64, Å), minimum image when ``box`` is given."""
    d2 = np.zeros((len(a), len(b)))
    for axis in range(3):
        d = b[None, :, axis].astype(np.float64) - a[:, None, axis]
        if box is not None:
            d -= box[axis] * np.round(d / box[axis])
        d2 += d * d
    return np.sqrt(d2)


def brute_pairs(points, radius, box=None):
    i, j = np.nonzero(np.triu(distances(points, points, box) <= radius, 1))
    return np.stack([i, j], axis=1)


def cloud(kind, seed=0):
    """float32 test clouds (Å), all reaching into negative coordinates."""
    rng = np.random.default_rng(seed)
    if kind == "sparse":  # a 200 Å box: the cell budget, not the cutoff, sets the cells
        points = rng.uniform(-100.0, 100.0, (300, 3))
        points = np.concatenate([points, points[:100] + rng.normal(scale=1.2, size=(100, 3))])
    elif kind == "dense":  # 2 cells per axis, about 125 points per cell
        points = rng.uniform(-3.0, 3.0, (1000, 3))
    elif kind == "clustered":
        centres = rng.uniform(-30.0, 30.0, (5, 3))
        points = (centres[:, None, :] + rng.normal(scale=1.5, size=(5, 200, 3))).reshape(-1, 3)
    elif kind == "lattice":  # spacing 1.25 over 10 Å: 4 cells of 2.5 Å, points on every cell boundary
        axis = np.arange(9) * 1.25 - 5.0
        points = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    return points.astype(np.float32)


@pytest.mark.parametrize("kind", ["sparse", "dense", "clustered", "lattice"])
@pytest.mark.parametrize("radius", [None, 1.7])
def test_pairs_open(arch, kind, radius):
    points = cloud(kind)
    g = grid()
    g.build(points)
    dims, edge = g.cell_shape()
    assert np.prod(dims) <= 4096 and np.all(edge >= CUTOFF)  # the cell budget of a 2048-point grid
    if kind == "lattice":
        np.testing.assert_array_equal(dims, [4, 4, 4])
        np.testing.assert_allclose(edge, 2.5, rtol=1e-6)
    expected = brute_pairs(points, CUTOFF if radius is None else radius)
    assert len(expected) > 0
    np.testing.assert_array_equal(g.pairs(radius), expected)


def test_pairs_periodic(arch):
    span = np.asarray(BOX)
    points = np.random.default_rng(1).uniform(-0.5 * span, 1.5 * span, (400, 3)).astype(np.float32)
    g = grid(BOX)
    g.build(points)
    np.testing.assert_array_equal(g.cell_shape()[0], [1, 2, 9])
    expected = brute_pairs(points, CUTOFF, BOX)
    wrapped = np.mod(points.astype(np.float64), span)
    across = distances(wrapped, wrapped)[expected[:, 0], expected[:, 1]] > CUTOFF
    assert across.sum() > 100  # pairs that only the minimum image brings together
    np.testing.assert_array_equal(g.pairs(), expected)
    np.testing.assert_array_equal(g.pairs(1.7), brute_pairs(points, 1.7, BOX))


@pytest.mark.parametrize("box", [None, BOX])
def test_nearest_and_count_within(arch, box):
    rng = np.random.default_rng(2)
    points = cloud("clustered") if box is None else rng.uniform(0.0, BOX, (20, 3)).astype(np.float32)
    queries = rng.uniform(points.min(0) - 3.0, points.max(0) + 3.0, (700, 3)).astype(np.float32)
    g = grid(box)
    g.build(points)
    d = distances(queries, points, box)
    expected_index = np.where(d.min(1) <= CUTOFF, d.argmin(1), -1)
    assert 0 < (expected_index >= 0).sum() < len(queries)
    distance, index = g.nearest(queries)
    np.testing.assert_array_equal(index, expected_index)
    found = index >= 0
    np.testing.assert_allclose(distance[found], d.min(1)[found], rtol=1e-5, atol=1e-6)
    assert np.all(np.isinf(distance[~found]))
    within = distances(points, points, box) <= 1.7
    np.testing.assert_array_equal(g.count_within(1.7), within.sum(1) - 1)


def repulsion_energy(points, d_min, strength, box=None):
    d = distances(points, points, box)[np.triu_indices(len(points), 1)]
    return strength * np.sum(np.clip(d_min - d, 0.0, None) ** 2)


@pytest.mark.parametrize("box", [None, BOX])
def test_repulsion_gradient(arch, box):
    """Energy and gradient at points that moved (≤ 0.17 Å) since the build: within the skin of
    cutoff − d_min = 0.4 Å every close pair must still be found."""
    rng = np.random.default_rng(3)
    d_min, strength = 2.0, 0.7
    built = rng.uniform(-6.0, 6.0, (300, 3)).astype(np.float32)
    moved = (built + rng.uniform(-0.1, 0.1, built.shape)).astype(np.float32)
    g = grid(box)
    pos, grad = positions_field(built)
    g.build_from_field(pos, len(built))
    np.testing.assert_array_equal(g.pairs(), brute_pairs(built, CUTOFF, box))
    pos, grad = positions_field(moved)
    grad.fill(1.0)
    energy = g.repulsion_gradient(pos, len(moved), d_min, strength, grad)
    reference = repulsion_energy(moved, d_min, strength, box)
    assert reference > 1.0
    assert energy == pytest.approx(reference, rel=1e-5)
    gradient = grad.to_numpy()[: len(moved)].astype(np.float64) - 1.0
    h = 1e-4
    for index in rng.choice(moved.size, 24, replace=False):
        i, axis = divmod(int(index), 3)
        step = np.zeros_like(moved, dtype=np.float64)
        step[i, axis] = h
        fd = (repulsion_energy(moved + step, d_min, strength, box)
              - repulsion_energy(moved - step, d_min, strength, box)) / (2 * h)
        assert gradient[i, axis] == pytest.approx(fd, rel=1e-3, abs=1e-3)


def test_determinism(arch):
    """Enough points for several CPU threads: the atomic fill order varies, results must not."""
    points = np.random.default_rng(4).uniform(-6.0, 6.0, (2000, 3)).astype(np.float32)
    g = grid()
    pos, grad = positions_field(points)
    results = []
    for _ in range(2):
        g.build_from_field(pos, len(points))
        grad.fill(0.0)
        energy = g.repulsion_gradient(pos, len(points), 1.0, 1.0, grad)
        results.append((g.pairs(), energy, grad.to_numpy()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]
    np.testing.assert_array_equal(results[0][2], results[1][2])


def test_capacity_growth(arch):
    g = grid()
    g.build(cloud("lattice"))
    capacity = g.cells.capacity
    points = np.random.default_rng(5).uniform(-12.0, 12.0, (capacity + 1, 3)).astype(np.float32)
    g.build(points)
    assert g.cells.capacity > capacity
    np.testing.assert_array_equal(g.pairs(), brute_pairs(points, CUTOFF))


def test_empty_and_bad_input(arch):
    g = grid()
    g.build(np.zeros((0, 3)))
    assert g.pairs().shape == (0, 2)
    distance, index = g.nearest([[0.0, 0.0, 0.0]])
    assert np.isinf(distance[0]) and index[0] == -1
    with pytest.raises(ValueError):
        g.pairs(CUTOFF * 1.01)
    with pytest.raises(ValueError):
        g.build(np.array([[0.0, np.nan, 0.0]]))
    with pytest.raises(ValueError):
        NeighbourGrid(CUTOFF, box=(1.0, 0.0, 1.0))
