"""Density control: the strategy that changes the number of atoms during a fit, kept apart from the
training loop (as gsplat's `Strategy`). Before each step the trainer calls `step_pre`; every
``densify_every`` steps during the first ``densify_until`` of the run it runs one round:

1. cull atoms fainter than ``cull_fraction`` of the median amplitude (of the atoms every view sees),
   whose amplitude does not stand out of the residual (`SeedVolumes.significant`), or outside the support;
2. merge pairs closer than d_min, closest first, into their amplitude-weighted mean;
3. split atoms wider than ``split_width`` × the median width into two halves 1.2 σ apart;
4. spawn atoms at peaks of the back-projected residual (above ``spawn_fraction`` of a typical
   atom's back-projection) that have no atom within d_min; not in the last round, which only removes.

Host neighbour queries use scipy's k-d tree.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from engine.fit.problem import with_moments


class DensityControl:
    """settings: the fit's settings (cull_fraction, split_width, spawn_fraction, densify_every,
    densify_until); volumes: the `SeedVolumes`; rng: the fit's NumPy generator (split directions)."""

    def __init__(self, settings, volumes, d_min: float, rng: np.random.Generator, blur: float = 0.0):
        self.settings, self.volumes, self.d_min, self.rng, self.blur = settings, volumes, d_min, rng, blur

    def counting(self, iteration: int, total: int) -> bool:
        """Whether step ``iteration`` of ``total`` still belongs to the phase that changes the count."""
        return iteration < int(self.settings.densify_until * total)

    def step_pre(self, problem, iteration: int, total: int) -> dict | None:
        """Before step ``iteration``: a round when one is due; returns its changes, else None."""
        if not (self.counting(iteration, total) and iteration > 0 and iteration % self.settings.densify_every == 0):
            return None
        if problem.refiner is not None:  # the volumes follow the refined geometry
            self.volumes.set_geometry(problem.geometry)
        state = problem.state()
        significant = self.volumes.significant(state, problem.predicted(np.arange(problem.n_tilts)), self.blur)
        state, changes = self.cull_merge_split(state, significant)
        problem.upload(state)  # the residual that guides spawning is that of the atoms kept so far
        if not self.counting(iteration + self.settings.densify_every, total):
            # The last round only removes: an atom spawned now would never be tested again.
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
            d = np.linalg.norm(state["pos"][pairs[:, 0]] - state["pos"][pairs[:, 1]], axis=1)
            alive = np.ones(len(state["pos"]), bool)
            for i, j in pairs[np.lexsort((pairs[:, 1], pairs[:, 0], d))]:
                if alive[i] and alive[j]:
                    w = state["amp"][[i, j]] / state["amp"][[i, j]].sum()
                    state["pos"][i] = w @ state["pos"][[i, j]]
                    state["sigma"][i] = w @ state["sigma"][[i, j]]
                    state["amp"][i] = state["amp"][[i, j]].sum()
                    state["m"][i], state["v"][i], state["age"][i] = 0, 0, 0
                    alive[j] = False
            changes["merged"] = int((~alive).sum())
            state = {k: v[alive] for k, v in state.items()}

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
