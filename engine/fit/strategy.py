"""Density control: the strategy that changes the number of atoms during a fit, kept apart from the
training loop (as gsplat's `Strategy`). The trainer decides when a round is due (`engine.fit.trainer`:
when the fit has settled, until a round adds no atom); `round` runs one:

1. cull atoms fainter than ``cull_fraction`` of the median amplitude (of the atoms every view sees),
   whose amplitude does not stand out of the residual (`SeedVolumes.significant`), or outside the support;
2. merge pairs closer than d_min, closest first, into their amplitude-weighted mean;
3. split atoms wider than ``split_width`` × the median width into two halves 1.2 σ apart;
4. spawn atoms at peaks of the back-projected residual (above ``spawn_fraction`` of a typical
   atom's back-projection) that have no atom within d_min; not in a round that only removes.

Host neighbour queries use scipy's k-d tree.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from engine.fit.problem import with_moments


def closest_first_matching(pos: np.ndarray, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pairs (i < j, rows of ``pairs``) that merging closest pair first takes, each atom in at most
    one: the same as walking the pairs by distance (ties by i, then j) and taking every pair whose two
    atoms are both still free, but in O(P log P) array passes instead of a Python loop. A pair that is
    the first in that order among all free pairs touching either of its atoms is taken in the walk
    too (nothing before it can claim its atoms), so taking all such pairs at once, freeing the rest
    and repeating gives the walk's result."""
    d = np.linalg.norm(pos[pairs[:, 0]] - pos[pairs[:, 1]], axis=1)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], d))
    i, j = pairs[order, 0], pairs[order, 1]
    rank = np.arange(len(order))
    taken_i, taken_j = [], []
    while len(rank):
        first = np.full(len(pos), len(order))
        np.minimum.at(first, i, rank)
        np.minimum.at(first, j, rank)
        take = (first[i] == rank) & (first[j] == rank)
        taken_i.append(i[take])
        taken_j.append(j[take])
        busy = np.zeros(len(pos), bool)
        busy[i[take]] = busy[j[take]] = True
        free = ~(busy[i] | busy[j])
        i, j, rank = i[free], j[free], rank[free]
    return np.concatenate(taken_i), np.concatenate(taken_j)


class DensityControl:
    """settings: the fit's settings (cull_fraction, split_width, spawn_fraction, densify_every,
    densify_until); volumes: the `SeedVolumes`; rng: the fit's NumPy generator (split directions)."""

    def __init__(self, settings, volumes, d_min: float, rng: np.random.Generator, blur: float = 0.0):
        self.settings, self.volumes, self.d_min, self.rng, self.blur = settings, volumes, d_min, rng, blur

    def round(self, problem, spawn: bool = True) -> dict:
        """One round on ``problem``'s atoms; returns how many were culled, merged, split and spawned
        (also before the first step of a warm start, whose atoms come from a finished fit, so that the
        residual already shows what changed). Without ``spawn`` it only removes (the last round: an
        atom spawned then would never be tested)."""
        if problem.refiner is not None:  # the volumes follow the refined geometry
            self.volumes.set_geometry(problem.geometry)
        state = problem.state()
        significant = self.volumes.significant(state, problem.predicted(np.arange(problem.n_tilts)), self.blur)
        state, changes = self.cull_merge_split(state, significant)
        problem.upload(state)  # the residual that guides spawning is that of the atoms kept so far
        if not spawn:
            changes["spawned"] = 0
            return changes
        spawned = self.spawn(state, problem.predicted(np.arange(problem.n_tilts)))
        changes["spawned"] = len(spawned["pos"])
        if len(spawned["pos"]):
            kept = problem.state()
            problem.upload({k: np.concatenate([kept[k], spawned[k]]) for k in kept})
        return changes

    def cull_merge_split(self, state: dict, significant: np.ndarray | None = None) -> tuple[dict, dict]:
        """Steps 1–3 on a host state (pos, amp, sigma, m, v, age); returns it and the counts.
        ``significant``: which amplitudes stand out of the residual (`SeedVolumes.significant`; None: all)."""
        s = self.settings
        n0 = len(state["pos"])
        typical_amp = np.median(state["amp"][self.volumes.reference(state["pos"])]) if n0 else 0.0
        keep = (state["amp"] > s.cull_fraction * typical_amp) & self.volumes.in_support(state["pos"])
        if significant is not None:
            keep &= significant
        changes = {"culled": int(n0 - keep.sum())}
        state = {k: v[keep] for k, v in state.items()}

        pairs = cKDTree(state["pos"]).query_pairs(self.d_min, output_type="ndarray") if len(state["pos"]) else []
        if len(pairs):
            i, j = closest_first_matching(state["pos"], pairs)
            a = state["amp"]
            w_i, w_j = a[i] / (a[i] + a[j]), a[j] / (a[i] + a[j])
            state["pos"][i] = w_i[:, None] * state["pos"][i] + w_j[:, None] * state["pos"][j]
            state["sigma"][i] = w_i * state["sigma"][i] + w_j * state["sigma"][j]
            state["amp"][i] = a[i] + a[j]
            state["m"][i], state["v"][i], state["age"][i] = 0, 0, 0
            alive = np.ones(len(state["pos"]), bool)
            alive[j] = False
            changes["merged"] = len(j)
            state = {k: v[alive] for k, v in state.items()}
        else:
            changes["merged"] = 0

        wide = state["sigma"] > s.split_width * np.median(state["sigma"])
        changes["split"] = int(wide.sum())
        if wide.any():
            # Two halves 1.2 σ apart along a random direction; the fit then pulls them onto atoms.
            parent = {k: v[wide] for k, v in state.items()}
            direction = self.rng.normal(size=(len(parent["pos"]), 3))
            offset = direction / np.linalg.norm(direction, axis=1, keepdims=True) * 0.6 * parent["sigma"][:, None]
            halves = [with_moments({"pos": parent["pos"] + sign * offset, "amp": 0.5 * parent["amp"],
                                    "sigma": 0.8 * parent["sigma"]}) for sign in (1, -1)]
            state = {k: np.concatenate([state[k][~wide]] + [h[k] for h in halves]) for k in state}
        return state, changes

    def spawn(self, state: dict, predicted: np.ndarray) -> dict:
        """Step 4: new atoms (with fresh moments) at peaks of the back-projected residual of the
        ``predicted`` images that have no atom of ``state`` within d_min."""
        v = self.volumes
        volume = v.fbp(v.images - predicted)
        reference = state["pos"][v.reference(state["pos"])] if len(state["pos"]) else state["pos"]
        typical = float(np.median(v.sample(v.data_fbp, reference))) if len(reference) else 1.0
        positions, values = v.peaks(volume, self.settings.spawn_fraction * typical)
        if len(positions) and len(state["pos"]):
            distance, _ = cKDTree(state["pos"]).query(positions)
            free = distance > self.d_min
            positions, values = positions[free], values[free]
        n = len(positions)
        amp = np.median(state["amp"]) if len(state["amp"]) else 1.0
        sigma = np.median(state["sigma"]) if len(state["sigma"]) else 0.35
        return with_moments({"pos": positions, "amp": np.full(n, amp) * np.clip(values / typical, 0.2, 1.0),
                             "sigma": np.full(n, sigma)})
