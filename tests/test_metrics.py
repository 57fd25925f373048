"""Atom matching and scores: hand-made cases with known answers, a brute-force cross-check of the
optimal matching, and the 1e5-atom timing."""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest

from engine.io.atoms import Atoms
from engine.core.errors import InputError
from engine.evaluate.metrics import evaluate_atoms, format_table, match_atoms


def _line(*xs) -> np.ndarray:
    """Positions [Å] on the x axis."""
    return np.array([[x, 0.0, 0.0] for x in xs])


def _lattice(n: int, spacing: float = 2.5) -> np.ndarray:
    """The first n points of a simple cubic lattice [Å]."""
    side = int(np.ceil(n ** (1 / 3)))
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    return grid[:n] * spacing


# ------------------------------------------------------------------------------------- matching

def test_perfect_match_in_shuffled_order():
    true = _lattice(27)
    order = np.random.default_rng(0).permutation(27)
    m = match_atoms(true[order], true, radius=1.0)
    assert m.n_matched == 27 and (m.precision, m.recall, m.f1) == (1.0, 1.0, 1.0)
    # zero distances must still be edges: every pred finds its own atom
    np.testing.assert_array_equal(m.pairs, np.stack([np.arange(27), order], axis=1))
    np.testing.assert_array_equal(m.distances, np.zeros(27))


def test_duplicates_two_predictions_at_one_true_atom():
    m = match_atoms(_line(0.3, 0.1), _line(0.0))
    assert (m.n_pred, m.n_true, m.n_matched) == (2, 1, 1)
    assert m.precision == 0.5 and m.recall == 1.0 and m.f1 == pytest.approx(2 / 3, abs=1e-15)
    np.testing.assert_array_equal(m.pairs, [[1, 0]])  # the closer of the two


def test_misses():
    m = match_atoms(_line(10.2), _line(0.0, 10.0, 20.0))
    assert m.precision == 1.0 and m.recall == pytest.approx(1 / 3, abs=1e-15)
    assert m.f1 == 0.5
    np.testing.assert_array_equal(m.pairs, [[0, 1]])


def test_maximum_matching_beats_greedy_nearest_neighbour():
    # pred A (0.2) is nearest to true 1 (0.0) but also within reach of true 2 (1.1); pred B (-0.5)
    # reaches only true 1. Greedy takes A-1 first and leaves B unmatched; optimal matches both.
    m = match_atoms(_line(0.2, -0.5), _line(0.0, 1.1), radius=1.0)
    assert m.n_matched == 2
    np.testing.assert_array_equal(m.pairs, [[0, 1], [1, 0]])
    np.testing.assert_allclose(m.distances, [0.9, 0.5], atol=1e-12)


def test_least_total_distance_among_full_matchings():
    # Greedy would take P1-T2 (0.4) then P2-T1 (1.7): total 2.1; optimal P1-T1 + P2-T2: total 1.3.
    m = match_atoms(_line(0.6, 1.7), _line(0.0, 1.0), radius=2.0)
    np.testing.assert_array_equal(m.pairs, [[0, 0], [1, 1]])
    assert m.distances.sum() == pytest.approx(1.3, abs=1e-12)


def _brute_force(pred, true, radius):
    """Largest number of pairs, then least total distance, over all partial one-to-one maps."""
    best = (0, 0.0)
    for k in range(1, min(len(pred), len(true)) + 1):
        for ps in itertools.combinations(range(len(pred)), k):
            for ts in itertools.permutations(range(len(true)), k):
                d = np.linalg.norm(pred[list(ps)] - true[list(ts)], axis=1)
                if np.all(d <= radius) and (k, -d.sum()) > (best[0], -best[1]):
                    best = (k, d.sum())
    return best


@pytest.mark.parametrize("seed", range(20))
def test_agrees_with_brute_force_on_small_crowded_clusters(seed):
    rng = np.random.default_rng(seed)
    pred = rng.uniform(0, 2.0, size=(rng.integers(1, 6), 3))
    true = rng.uniform(0, 2.0, size=(rng.integers(1, 6), 3))
    m = match_atoms(pred, true, radius=1.0)
    n_best, total_best = _brute_force(pred, true, 1.0)
    assert m.n_matched == n_best
    assert m.distances.sum() == pytest.approx(total_best, abs=1e-9)
    assert len(set(m.pairs[:, 0])) == len(set(m.pairs[:, 1])) == m.n_matched  # one-to-one


def test_radius_is_inclusive_and_cuts_just_outside():
    true = _line(0.0)
    assert match_atoms(_line(1.0), true, radius=1.0).n_matched == 1
    assert match_atoms(_line(0.999999), true, radius=1.0).n_matched == 1
    assert match_atoms(_line(1.000001), true, radius=1.0).n_matched == 0


def test_empty_prediction_and_empty_truth():
    none = np.zeros((0, 3))
    for m in (match_atoms(none, _line(0.0, 5.0)), match_atoms(_line(0.0), none)):
        assert m.n_matched == 0 and (m.precision, m.recall, m.f1) == (0.0, 0.0, 0.0)
        assert m.pairs.shape == (0, 2) and m.distances.shape == (0,)
    both = match_atoms(none, none)
    assert (both.precision, both.recall, both.f1) == (1.0, 1.0, 1.0)


def test_no_candidates_within_radius():
    m = match_atoms(_line(0.0, 5.0), _line(2.0, 8.0), radius=1.0)
    assert m.n_matched == 0 and (m.precision, m.recall, m.f1) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("radius", [0.0, -1.0, np.nan, np.inf])
def test_bad_radius_is_an_input_error(radius):
    with pytest.raises(InputError, match="radius"):
        match_atoms(_line(0.0), _line(0.0), radius=radius)


def test_non_finite_positions_are_an_input_error():
    with pytest.raises(InputError, match="predicted positions"):
        match_atoms(_line(np.nan), _line(0.0))


def test_1e5_jittered_atoms_match_in_under_10_s():
    rng = np.random.default_rng(1)
    true = _lattice(100_000)
    pred = (true + rng.normal(scale=0.1, size=true.shape))[rng.permutation(len(true))]
    start = time.perf_counter()
    m = match_atoms(pred, true, radius=1.0)
    elapsed = time.perf_counter() - start
    assert m.recall == 1.0 and m.precision == 1.0
    assert elapsed < 10.0, f"matching 1e5 atoms took {elapsed:.1f} s"


# ------------------------------------------------------------------------------------- evaluation

def test_evaluate_perfect_match():
    truth = Atoms(["Au"] * 8, _lattice(8))
    result = evaluate_atoms(truth.copy(), truth)
    assert (result["precision"], result["recall"], result["f1"]) == (1.0, 1.0, 1.0)
    assert result["rmsd_pm"] == 0.0
    assert result["rmsd_axis_pm"] == {"x": 0.0, "y": 0.0, "z": 0.0}
    assert result["species_accuracy"] == 1.0 and result["confusion"] == {"Au": {"Au": 8}}


def test_evaluate_uniform_shift():
    truth = Atoms(["Pt"] * 27, _lattice(27))
    shift = np.array([0.1, -0.2, 0.2])  # Å, |shift| = 0.3 Å = 30 pm
    result = evaluate_atoms(Atoms(["Pt"] * 27, truth.positions + shift), truth)
    assert result["f1"] == 1.0
    assert result["rmsd_pm"] == pytest.approx(30.0, abs=1e-9)
    for axis, rms, mean in zip("xyz", (10.0, 20.0, 20.0), (10.0, -20.0, 20.0)):
        assert result["rmsd_axis_pm"][axis] == pytest.approx(rms, abs=1e-9)
        assert result["mean_offset_pm"][axis] == pytest.approx(mean, abs=1e-9)


def test_evaluate_f1_at_several_radii():
    truth = Atoms(["C"] * 2, _line(0.0, 10.0))
    pred = Atoms(["C"] * 2, _line(0.3, 10.7))  # errors 30 pm and 70 pm
    result = evaluate_atoms(pred, truth, radius=1.0, radii_extra=(0.5,))
    assert result["f1_at"] == {"0.5": 0.5, "1.0": 1.0}
    assert list(result["f1_at"]) == ["0.5", "1.0"]
    assert result["rmsd_pm"] == pytest.approx(np.sqrt((30.0 ** 2 + 70.0 ** 2) / 2), abs=1e-9)


def test_evaluate_species_accuracy_and_confusion():
    positions = _lattice(5)
    truth = Atoms(["Au", "Pt", "Pt", "Pt", "Pt"], positions)
    pred = Atoms(["Au", "Au", "Pt", "X"], positions[:4])  # the last true atom is missed
    result = evaluate_atoms(pred, truth)
    assert result["recall"] == 0.8 and result["precision"] == 1.0
    assert result["species_accuracy"] == 0.5
    assert result["confusion"] == {"Au": {"Au": 1}, "Pt": {"Au": 1, "Pt": 1, "X": 1}}


def test_evaluate_species_unknown_gives_none():
    positions = _lattice(4)
    known, unknown = Atoms(["Au"] * 4, positions), Atoms(["X"] * 4, positions)
    for pred, truth in ((unknown, known), (known, unknown)):
        result = evaluate_atoms(pred, truth)
        assert result["species_accuracy"] is None and result["confusion"] is None


def test_evaluate_empty_prediction_is_json_able_and_tabulates():
    truth = Atoms(["Au", "Pt"], _line(0.0, 5.0))
    result = evaluate_atoms(Atoms(np.zeros(0, str), np.zeros((0, 3))), truth)
    assert (result["precision"], result["recall"], result["f1"]) == (0.0, 0.0, 0.0)
    assert result["rmsd_pm"] is None and result["mean_offset_pm"] is None
    assert json.loads(json.dumps(result)) == result
    assert "n/a" in format_table(result)


def test_format_table_shows_scores_and_confusion():
    truth = Atoms(["Au", "Pt"], _line(0.0, 5.0))
    pred = Atoms(["Au", "Au"], _line(0.1, 5.0))
    result = evaluate_atoms(pred, truth)
    assert json.loads(json.dumps(result)) == result
    table = format_table(result)
    assert "f1                1.0000" in table
    assert "species accuracy  0.5000" in table
    assert "rmsd              7.07 pm" in table  # sqrt((10^2 + 0^2) / 2) pm
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[-2:]}
    assert rows == {"Au": ["1"], "Pt": ["1"]}
