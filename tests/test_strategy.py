"""The density-control strategy on hand-made states: cull, merge, split and spawn, each against what
the rule says, with stand-in volumes so only the strategy's own logic is under test."""

import numpy as np
import pytest

from engine.fit.problem import with_moments
from engine.fit.settings import fit_settings
from engine.fit.strategy import DensityControl, closest_first_matching


class Volumes:
    """A support of |x|, |y|, |z| < 10 Å; peaks of a 'volume' given as a list of (position, value)."""

    def __init__(self, peaks=()):
        self.peak_list = list(peaks)
        self.images = np.zeros((1, 4, 4))
        self.data_fbp = "data"

    def in_support(self, positions):
        return np.all(np.abs(positions) < 10, axis=1)

    def reference(self, positions):
        """Every view sees |x| < 5 Å (an extended specimen's window); the margin beyond."""
        inside = np.abs(positions[:, 0]) < 5
        return inside if inside.any() else np.ones(len(positions), bool)

    def fbp(self, images):
        return "residual"

    def sample(self, volume, positions):
        return np.ones(len(positions))

    def peaks(self, volume, threshold):
        kept = [(p, v) for p, v in self.peak_list if v > threshold]
        return (np.array([p for p, _ in kept]).reshape(-1, 3), np.array([v for _, v in kept]))


def state(pos, amp=None, sigma=None):
    pos = np.asarray(pos, np.float64)
    n = len(pos)
    return with_moments({"pos": pos, "amp": np.ones(n) if amp is None else np.asarray(amp, np.float64),
                         "sigma": np.full(n, 0.4) if sigma is None else np.asarray(sigma, np.float64)})


def strategy(peaks=(), **settings):
    return DensityControl(fit_settings(settings), Volumes(peaks), d_min=1.5, rng=np.random.default_rng(0))


def test_cull_faint_and_outside_atoms():
    s = state([[0, 0, 0], [3, 0, 0], [0, 3, 0], [20, 0, 0]], amp=[1.0, 1.0, 0.2, 1.0])
    out, changes = strategy().cull_merge_split(s)
    assert changes["culled"] == 2
    np.testing.assert_array_equal(out["pos"], [[0, 0, 0], [3, 0, 0]])


def test_cull_measures_faintness_against_the_atoms_every_view_sees():
    # Margin atoms (|x| ≥ 5 Å) are many and faint; the window's atoms set the typical amplitude, so a
    # margin atom at 20 % of it goes although it is the median of all.
    s = state([[0, 0, 0], [3, 0, 0], [6, 0, 0], [7, 0, 0], [8, 0, 0], [9, 0, 0]],
              amp=[1.0, 1.0, 0.2, 0.2, 0.2, 1.0])
    out, changes = strategy().cull_merge_split(s)
    assert changes["culled"] == 3
    np.testing.assert_array_equal(out["pos"][:, 0], [0, 3, 9])


def test_merge_closest_pair_first_into_weighted_mean():
    # a–b 0.5 Å apart, b–c 1.1 Å: a and b merge (closest first), c stays although within d_min of b.
    s = state([[0, 0, 0], [0.5, 0, 0], [1.6, 0, 0], [5, 0, 0]], amp=[3.0, 1.0, 1.0, 1.0],
              sigma=[0.4, 0.8, 0.4, 0.4])
    s["m"][0] = 1.0
    out, changes = strategy().cull_merge_split(s)
    assert changes["merged"] == 1 and len(out["pos"]) == 3
    np.testing.assert_allclose(out["pos"][0], [0.125, 0, 0])   # amplitude-weighted
    assert out["amp"][0] == 4.0 and out["sigma"][0] == 0.5
    assert not out["m"][0].any() and out["age"][0] == 0          # a new atom to Adam


def test_split_wide_atom_into_two_halves():
    s = state([[0, 0, 0], [4, 0, 0], [-4, 0, 0]], sigma=[0.4, 0.4, 1.0])
    out, changes = strategy().cull_merge_split(s)
    assert changes["split"] == 1 and len(out["pos"]) == 4
    halves = out["pos"][-2:]
    np.testing.assert_allclose(halves.mean(axis=0), [-4, 0, 0], atol=1e-12)
    assert np.linalg.norm(halves[0] - halves[1]) == pytest.approx(1.2)  # 1.2 σ apart
    np.testing.assert_allclose(out["amp"][-2:], 0.5)
    np.testing.assert_allclose(out["sigma"][-2:], 0.8)


def test_spawn_only_at_strong_peaks_away_from_atoms():
    s = state([[0, 0, 0]], amp=[2.0])
    peaks = [([0.5, 0, 0], 1.0),   # strong but within d_min of the atom: no
             ([4, 0, 0], 0.8),     # strong and free: yes, amplitude 0.8 of the median
             ([-4, 0, 0], 0.1)]    # below spawn_fraction (0.35) of a typical atom: no
    spawned = strategy(peaks).spawn(s, predicted=np.zeros((1, 4, 4)))
    np.testing.assert_array_equal(spawned["pos"], [[4, 0, 0]])
    np.testing.assert_allclose(spawned["amp"], [1.6])
    assert not spawned["m"].any() and spawned["age"][0] == 0


def test_closest_first_matching_is_the_greedy_walk():
    """The array passes take exactly the pairs the closest-first walk over all pairs takes."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(5)
    for n in (2, 30, 400):
        pos = rng.uniform(0, n ** (1 / 3) * 1.2, (n, 3))
        pos[n // 2:] = np.round(pos[n // 2:], 1)  # ties in distance
        pairs = cKDTree(pos).query_pairs(1.5, output_type="ndarray")
        if not len(pairs):
            continue
        d = np.linalg.norm(pos[pairs[:, 0]] - pos[pairs[:, 1]], axis=1)
        free, walk = np.ones(n, bool), set()
        for a, b in pairs[np.lexsort((pairs[:, 1], pairs[:, 0], d))]:
            if free[a] and free[b]:
                free[a] = free[b] = False
                walk.add((a, b))
        i, j = closest_first_matching(pos, pairs)
        assert set(zip(i.tolist(), j.tolist())) == walk and len(i) == len(walk)


def test_suppress_close_is_the_greedy_walk_brightest_first():
    from scipy.spatial import cKDTree

    from engine.kernels.volume import suppress_close

    rng = np.random.default_rng(2)
    for n in (1, 40, 500):
        pos = rng.uniform(0, n ** (1 / 3) * 1.5, (n, 3))
        values = np.sort(rng.uniform(size=n))[::-1]
        keep = np.ones(n, bool)
        for i, j in sorted(cKDTree(pos).query_pairs(1.5)):
            if keep[i]:
                keep[j] = False
        kept, kept_values = suppress_close(pos, values, 1.5)
        np.testing.assert_array_equal(kept, pos[keep])
        np.testing.assert_array_equal(kept_values, values[keep])


def test_significance_level_is_the_normal_quantile_of_one_false_atom():
    """z such that P(Z > z) = 1 / (volume / d_min³): one false atom on average in the volume."""
    from scipy import stats

    from engine.fit.seeding import significance_level

    for volume in (1e2, 1e4, 1e6, 1e9):
        assert abs(significance_level(volume, 2.5) - stats.norm.isf(2.5 ** 3 / volume)) < 1e-9
    assert significance_level(1.0, 2.5) == 0.0  # fewer than two places: the median, z = 0
