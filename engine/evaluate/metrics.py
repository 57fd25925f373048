"""Scoring a reconstruction against a known structure: one-to-one atom matching and its metrics.

A predicted atom and a true atom may be matched when they are at most `radius` apart [Å]. Among
all one-to-one matchings the one with the most pairs is chosen and, among those, the one with the
smallest total distance, so a crowded neighbourhood never costs matches the way greedy
nearest-neighbour pairing does. Precision, recall and F1 count matched pairs; position errors are
reported in picometres (1 Å = 100 pm) over matched pairs only, with displacement = pred - true.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, min_weight_full_bipartite_matching
from scipy.spatial import cKDTree

from engine.io.atoms import UNKNOWN_SPECIES, Atoms
from engine.core.errors import InputError

PM_PER_ANGSTROM = 100.0

# Added to every edge weight so that a zero distance is still a stored edge of the sparse graph.
# It adds the same amount to every matching with the same number of pairs, so it biases nothing.
_EDGE_EPS = 1e-6  # Å


@dataclass
class MatchResult:
    """
    A one-to-one matching of predicted to true atoms.

    Parameters
    ----------
    pairs : np.ndarray
        Matched index pairs (pred, true), shape (M, 2), int64, sorted by pred index.
    distances : np.ndarray
        Distance of each matched pair [Å], shape (M,), float64; every one is <= `radius`.
    n_pred : int
        Number of predicted atoms.
    n_true : int
        Number of true atoms.
    radius : float
        Largest distance at which two atoms may be matched [Å] (inclusive).

    Notes
    -----
    precision = M / n_pred, recall = M / n_true, f1 = 2 M / (n_pred + n_true). When both lists are
    empty all three are 1.0 (nothing to find, nothing spurious); when exactly one is empty all
    three are 0.0 (every atom on the other side is a miss or a false positive).
    """

    pairs: np.ndarray
    distances: np.ndarray
    n_pred: int
    n_true: int
    radius: float

    @property
    def n_matched(self) -> int:
        """Number of matched pairs M."""
        return len(self.pairs)

    def _empty_case(self) -> float | None:
        if self.n_pred == 0 and self.n_true == 0:
            return 1.0
        if self.n_pred == 0 or self.n_true == 0:
            return 0.0
        return None

    @property
    def precision(self) -> float:
        """Fraction of predicted atoms that are matched (see the class notes for empty lists)."""
        special = self._empty_case()
        return special if special is not None else self.n_matched / self.n_pred

    @property
    def recall(self) -> float:
        """Fraction of true atoms that are matched (see the class notes for empty lists)."""
        special = self._empty_case()
        return special if special is not None else self.n_matched / self.n_true

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall, 2 M / (n_pred + n_true)."""
        special = self._empty_case()
        return special if special is not None else 2.0 * self.n_matched / (self.n_pred + self.n_true)


def _check_positions(positions, name: str) -> np.ndarray:
    array = np.asarray(positions, dtype=np.float64)
    if array.size == 0:
        return array.reshape(0, 3)
    if array.ndim != 2 or array.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3), got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise InputError(name, "non-finite position (NaN or inf)")
    return array


def _check_radius(radius, name: str = "radius") -> float:
    radius = float(radius)
    if not (math.isfinite(radius) and radius > 0):
        raise InputError(name, f"matching radius must be a positive finite distance in Å, got {radius}")
    return radius


def match_atoms(pred_positions, true_positions, radius: float = 1.0) -> MatchResult:
    """
    Optimal one-to-one matching of predicted to true atoms within `radius`.

    Candidate pairs are all (pred, true) pairs at most `radius` apart (a k-d tree query, so the
    cost scales with the number of candidates, not N x M). The matching maximises the number of
    pairs and, among maximum matchings, minimises the sum of pair distances.

    Parameters
    ----------
    pred_positions : array_like
        Predicted positions [Å], shape (N_pred, 3).
    true_positions : array_like
        True positions [Å], shape (N_true, 3).
    radius : float
        Matching cutoff [Å]; a pair at exactly `radius` may be matched.

    Returns
    -------
    MatchResult

    Raises
    ------
    InputError
        Non-positive or non-finite radius, non-finite positions.
    """
    radius = _check_radius(radius)
    pred = _check_positions(pred_positions, "predicted positions")
    true = _check_positions(true_positions, "true positions")
    n_pred, n_true = len(pred), len(true)
    no_pairs = MatchResult(np.zeros((0, 2), np.int64), np.zeros(0), n_pred, n_true, radius)
    if n_pred == 0 or n_true == 0:
        return no_pairs
    # 'ndarray' output keeps zero distances (a sparse matrix output would drop them).
    candidates = cKDTree(pred).sparse_distance_matrix(cKDTree(true), radius, output_type="ndarray")
    if len(candidates) == 0:
        return no_pairs
    i, j, d = candidates["i"].astype(np.int64), candidates["j"].astype(np.int64), candidates["v"]
    matched_true = _solve_assignment(i, j, d, n_pred, n_true, radius)
    keep = matched_true >= 0
    pred_idx = np.flatnonzero(keep)
    true_idx = matched_true[keep]
    distances = np.linalg.norm(pred[pred_idx] - true[true_idx], axis=1)
    return MatchResult(np.stack([pred_idx, true_idx], axis=1), distances, n_pred, n_true, radius)


def _solve_assignment(i, j, d, n_pred: int, n_true: int, radius: float) -> np.ndarray:
    """
    Maximum matching of least total distance on the candidate graph; returns, for each predicted
    atom, the index of its true atom or -1.

    `min_weight_full_bipartite_matching` needs a perfect matching to exist, so the graph is
    augmented: rows are the predicted atoms then one dummy per true atom, columns the true atoms
    then one dummy per predicted atom. Edges: every candidate (pred i, true j) with weight d + eps;
    pred i to its own dummy and true j to its own dummy with weight C (left unmatched); dummy of
    true j to dummy of pred i for every candidate (i, j) with weight eps (both real atoms matched,
    so their dummies pair up). Any matching M of the candidate graph extends to a perfect matching
    of cost const - |M| (2C - 2 eps) + sum_M d, so with 2C - 2 eps > (max |M|) * radius every extra
    pair outweighs any distance change and ties in |M| go to the least total distance. C is set per
    connected component (the augmented graph splits along the same components), keeping it small
    next to the distances for floating-point resolution.
    """
    n_nodes = n_pred + n_true
    graph = coo_matrix((np.ones(len(i)), (i, n_pred + j)), shape=(n_nodes, n_nodes))
    _, labels = connected_components(graph, directed=False)
    component_size = np.bincount(labels)[labels]  # per node: pred + true atoms in its component
    # C with 2C - 2 eps > size * radius >= (max |M|) * radius within each component
    unmatched_cost = (component_size + 1) * (radius + _EDGE_EPS)

    pred_range, true_range = np.arange(n_pred), np.arange(n_true)
    rows = np.concatenate([i, pred_range, n_pred + true_range, n_pred + j])
    cols = np.concatenate([j, n_true + pred_range, true_range, n_true + i])
    weights = np.concatenate([d + _EDGE_EPS, unmatched_cost[:n_pred], unmatched_cost[n_pred:],
                              np.full(len(i), _EDGE_EPS)])
    augmented = coo_matrix((weights, (rows, cols)), shape=(n_nodes, n_nodes)).tocsr()
    row_ind, col_ind = min_weight_full_bipartite_matching(augmented)
    matched_true = np.full(n_nodes, -1, dtype=np.int64)
    matched_true[row_ind] = col_ind
    matched_true = matched_true[:n_pred]
    matched_true[matched_true >= n_true] = -1  # matched to its own dummy: unmatched
    return matched_true


def best_translation(pred_positions, true_positions, radius: float = 1.0, rounds: int = 20) -> np.ndarray:
    """
    The global translation [Å] that, added to the predicted positions, best superposes them on the
    true ones: for a reconstruction whose origin differs from the reference's (a measured series
    aligned by someone else), which matching alone would count as error.

    Alternates matching within `radius` and the mean displacement of the matched pairs (the least-
    squares shift for fixed pairs) until the pairs stop changing. Starts from a matching at
    2 x `radius` so a shift up to about that size is found.
    """
    radius = _check_radius(radius)
    pred = _check_positions(pred_positions, "predicted positions")
    true = _check_positions(true_positions, "true positions")
    shift = np.zeros(3)
    pairs = None
    for round_ in range(rounds):
        match = match_atoms(pred + shift, true, 2 * radius if round_ == 0 else radius)
        if match.n_matched == 0:
            break
        if pairs is not None and np.array_equal(match.pairs, pairs):
            break
        pairs = match.pairs
        shift = shift + np.mean(true[pairs[:, 1]] - (pred + shift)[pairs[:, 0]], axis=0)
    return shift


def evaluate_atoms(pred: Atoms, truth: Atoms, radius: float = 1.0, radii_extra=(0.5,)) -> dict:
    """
    Score predicted atoms against the true structure.

    Parameters
    ----------
    pred : Atoms
        Predicted atoms; positions [Å]. With an 'inside' column (an extended specimen's fit), only the
        atoms inside the always-visible window (inside == 1) are scored.
    truth : Atoms
        True atoms; positions [Å], same frame as `pred`.
    radius : float
        Matching cutoff [Å] for the main scores, position errors and species scores.
    radii_extra : sequence of float
        Further cutoffs [Å] at which F1 is also reported.

    Returns
    -------
    dict
        JSON-able (plain Python numbers, str keys):
        n_pred, n_true, n_matched, radius [Å], precision, recall, f1;
        n_pred_outside_not_scored : predicted atoms left out as outside the window;
        rmsd_pm : RMS distance of matched pairs [pm] (None when nothing matched);
        rmsd_axis_pm : {'x', 'y', 'z'}, per-axis RMS of the displacement pred - true [pm] (None when
        nothing matched);
        mean_offset_pm : {'x', 'y', 'z'}, mean displacement pred - true [pm], a global-shift
        diagnostic (None when nothing matched);
        f1_at : {str(cutoff in Å): F1} for `radius` and each of `radii_extra`, keys like '0.5',
        '1.0', in increasing cutoff;
        species_accuracy : fraction of matched pairs whose species agree (a predicted 'X' counts
        as wrong); None when either side has only 'X' species or nothing matched;
        confusion : {true species: {predicted species: count}} over matched pairs; None when either
        side has only 'X' species.
    """
    radius = _check_radius(radius)
    cutoffs = sorted({radius, *(_check_radius(r, "radii_extra") for r in radii_extra)})
    outside = 0
    if "inside" in pred.columns:  # an extended specimen's fit: the margin atoms are not the window's
        window = pred.columns["inside"] == 1
        outside = int(np.sum(~window))
        pred = pred.subset(window)
    match = match_atoms(pred.positions, truth.positions, radius)
    pred_idx, true_idx = match.pairs[:, 0], match.pairs[:, 1]
    displacement = (pred.positions[pred_idx] - truth.positions[true_idx]) * PM_PER_ANGSTROM

    def per_axis(values) -> dict | None:
        return None if values is None else dict(zip("xyz", (float(v) for v in values)))

    matched = match.n_matched > 0
    result = {
        "n_pred": match.n_pred,
        "n_true": match.n_true,
        "n_matched": match.n_matched,
        "radius": radius,
        "precision": float(match.precision),
        "recall": float(match.recall),
        "f1": float(match.f1),
        "rmsd_pm": float(np.sqrt(np.mean(np.sum(displacement ** 2, axis=1)))) if matched else None,
        "rmsd_axis_pm": per_axis(np.sqrt(np.mean(displacement ** 2, axis=0)) if matched else None),
        "mean_offset_pm": per_axis(displacement.mean(axis=0) if matched else None),
        "f1_at": {str(r): float(match.f1 if r == radius else match_atoms(pred.positions, truth.positions, r).f1)
                  for r in cutoffs},
        "n_pred_outside_not_scored": outside,
    }

    species_known = not (np.all(pred.species == UNKNOWN_SPECIES) or np.all(truth.species == UNKNOWN_SPECIES))
    if species_known:
        pred_species, true_species = pred.species[pred_idx], truth.species[true_idx]
        confusion: dict[str, dict[str, int]] = {}
        for t, p in zip(true_species.tolist(), pred_species.tolist()):
            row = confusion.setdefault(t, {})
            row[p] = row.get(p, 0) + 1
        result["species_accuracy"] = float(np.mean(pred_species == true_species)) if matched else None
        result["confusion"] = {t: dict(sorted(row.items())) for t, row in sorted(confusion.items())}
    else:
        result["species_accuracy"] = None
        result["confusion"] = None
    return result


def format_table(result: dict) -> str:
    """
    A plain-text table of an `evaluate_atoms` result: counts, scores, position errors [pm] and,
    when species are known, the species confusion matrix (rows true, columns predicted).
    """
    def number(value, digits=4) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    def xyz(values) -> str:
        return "n/a" if values is None else "  ".join(f"{k} {values[k]:8.2f}" for k in "xyz")

    lines = [
        f"atoms             pred {result['n_pred']}  true {result['n_true']}  matched {result['n_matched']}"
        + (f"  ({result['n_pred_outside_not_scored']} outside the window, not scored)"
           if result.get("n_pred_outside_not_scored") else ""),
        f"radius            {result['radius']:g} Å",
        f"precision         {number(result['precision'])}",
        f"recall            {number(result['recall'])}",
        f"f1                {number(result['f1'])}",
    ]
    lines += [f"f1 @ {cutoff} Å".ljust(18) + number(value) for cutoff, value in result["f1_at"].items()]
    lines += [
        f"rmsd              {number(result['rmsd_pm'], 2)} pm",
        f"rms per axis      {xyz(result['rmsd_axis_pm'])} pm",
        f"mean offset       {xyz(result['mean_offset_pm'])} pm",
        f"species accuracy  {number(result['species_accuracy'])}",
    ]
    if "translation_A" in result:
        lines.append(f"translation       {xyz({k: 100 * v for k, v in result['translation_A'].items()})} pm "
                     "(removed before scoring)")
    confusion = result["confusion"]
    if confusion:
        predicted = sorted({p for row in confusion.values() for p in row})
        width = max(6, *(len(s) + 2 for s in predicted))
        lines.append("confusion (rows true, columns predicted)")
        lines.append("true\\pred".ljust(10) + "".join(p.rjust(width) for p in predicted))
        for t, row in confusion.items():
            lines.append(t.ljust(10) + "".join(str(row.get(p, 0)).rjust(width) for p in predicted))
    return "\n".join(lines)
