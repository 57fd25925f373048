"""Following atoms through the states of a time series (4D AET): consecutive states are matched
one-to-one by the same optimal matching as scoring (`engine.evaluate.metrics.match_atoms`), so an
atom keeps its identity while it moves less than the matching radius; an atom of a state left
unmatched in the next has vanished there, one of the next left unmatched has appeared.

Displacements are in pm (1 Å = 100 pm), next minus previous. Their uncertainty, per axis:
- from the fits' own per-atom position uncertainties where the atoms files carry them (columns
  ``sigma_x``, ``sigma_y``, ``sigma_z`` in Å, or the isotropic ``pos_uncertainty``), the two
  states' added in quadrature (independent fits);
- else from the scatter of the step's displacements: 1.4826 × their median absolute deviation per
  axis, which estimates the σ of an atom that stayed as long as most atoms stay.
An atom has moved when Σ (d/σ)² over the three axes exceeds the χ²(3) quantile of `FALSE_ALARM`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.core.errors import InputError
from engine.evaluate.metrics import PM_PER_ANGSTROM, match_atoms
from engine.io.atoms import Atoms, read_atoms

FALSE_ALARM = 1e-3
"""Chance that an atom that stayed is called moved (per atom and step)."""
AXIS_COLUMNS = ("sigma_x", "sigma_y", "sigma_z")
MAD_TO_SIGMA = 1.4826  # σ of a normal distribution per median absolute deviation


def position_sigma(atoms: Atoms) -> np.ndarray | None:
    """Per-atom, per-axis 1σ position uncertainty (N, 3) Å from the atoms' columns, or None."""
    if all(c in atoms.columns for c in AXIS_COLUMNS):
        return np.stack([atoms.columns[c] for c in AXIS_COLUMNS], axis=1)
    if "pos_uncertainty" in atoms.columns:
        return np.repeat(atoms.columns["pos_uncertainty"][:, None], 3, axis=1)
    return None


def track_states(states: list[Atoms], radius: float = 1.0, names=None) -> dict:
    """Follow the atoms of ``states`` (in order); ``radius`` (Å) the largest step an atom may make and
    keep its identity. Returns the trajectory (JSON-able):

    states : per state its name and atom count.
    atoms  : per atom identity (``id``) its index in each state's list (None where absent), its
             positions (Å, None where absent), the state it first and last appears in, and per step
             it made: ``displacement_pm`` (x, y, z), ``distance_pm``, ``sigma_pm`` (x, y, z),
             ``chi2`` (Σ (d/σ)²) and ``moved`` (χ² above the `FALSE_ALARM` quantile).
    steps  : per pair of consecutive states the matched count, the identities that ``appeared``
             and ``vanished``, how σ was found (``sigma_source``) and the atoms that ``moved``.
    """
    from scipy.stats import chi2

    names = list(names) if names is not None else [f"state {k}" for k in range(len(states))]
    threshold = float(chi2.ppf(1 - FALSE_ALARM, 3))
    identity = [np.arange(len(states[0]))] if states else []
    tracks = [{"id": i, "index": [int(i)], "first_state": 0} for i in range(len(states[0]))] if states else []
    steps = []
    for k in range(1, len(states)):
        previous, current = states[k - 1], states[k]
        match = match_atoms(current.positions, previous.positions, radius)
        ids = np.full(len(current), -1)
        ids[match.pairs[:, 0]] = identity[k - 1][match.pairs[:, 1]]
        appeared = np.flatnonzero(ids < 0)
        ids[appeared] = np.arange(len(tracks), len(tracks) + len(appeared))
        for i in appeared:
            tracks.append({"id": int(ids[i]), "index": [None] * k + [int(i)], "first_state": k})
        for track in tracks:
            if len(track["index"]) == k:
                track["index"].append(None)
        for i, j in enumerate(ids):
            tracks[j]["index"][k] = int(i)
        identity.append(ids)
        vanished = sorted(int(t) for t in set(identity[k - 1].tolist()) - set(ids.tolist()))
        now, before = match.pairs[:, 0], match.pairs[:, 1]
        displacement = (current.positions[now] - previous.positions[before]) * PM_PER_ANGSTROM
        sigma_now, sigma_before = position_sigma(current), position_sigma(previous)
        if sigma_now is not None and sigma_before is not None:
            sigma = np.hypot(sigma_now[now], sigma_before[before]) * PM_PER_ANGSTROM
            source = "fits' per-atom uncertainties"
        else:
            median = np.median(displacement, axis=0) if len(displacement) else np.zeros(3)
            spread = np.median(np.abs(displacement - median), axis=0) if len(displacement) else np.zeros(3)
            sigma = np.broadcast_to(MAD_TO_SIGMA * spread, displacement.shape)
            source = "scatter of the step's displacements (1.4826 MAD per axis)"
        with np.errstate(divide="ignore", invalid="ignore"):
            chi = np.where(sigma > 0, (displacement / sigma) ** 2, np.where(displacement != 0, np.inf, 0.0)).sum(axis=1)
        moved = []
        for row, (i, d, s, c) in enumerate(zip(now, displacement, sigma, chi)):
            track = tracks[ids[i]]
            track.setdefault("steps", []).append({
                "to_state": k, "displacement_pm": d.tolist(), "distance_pm": float(np.linalg.norm(d)),
                "sigma_pm": s.tolist(), "chi2": float(c), "moved": bool(c > threshold)})
            if c > threshold:
                moved.append(int(ids[i]))
        steps.append({"from_state": k - 1, "to_state": k, "matched": int(match.n_matched),
                      "appeared": sorted(int(ids[i]) for i in appeared), "vanished": vanished,
                      "moved": sorted(moved), "sigma_source": source})
    for track in tracks:
        present = [k for k, i in enumerate(track["index"]) if i is not None]
        track["last_state"] = present[-1]
        track["positions_A"] = [None if i is None else states[k].positions[i].tolist()
                                for k, i in enumerate(track["index"])]
        track.setdefault("steps", [])
    return {"radius_A": float(radius), "false_alarm": FALSE_ALARM, "chi2_threshold": threshold,
            "states": [{"name": str(n), "n_atoms": len(s)} for n, s in zip(names, states)],
            "steps": steps, "atoms": tracks}


def write_trajectory(trajectory: dict, path) -> Path:
    from engine.core.files import write_atomically

    return write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(trajectory, indent=1)))


def state_atoms(trajectory_path) -> list[tuple[str, Atoms]]:
    """The states of a saved trajectory (``trajectory.json``, its states' ``atoms`` files relative to
    it) as (name, atoms) with two more columns: ``track_id`` and ``displacement_pm``, the distance the
    atom moved since the previous state (0 in the first state and for atoms that just appeared)."""
    path = Path(trajectory_path)
    try:
        trajectory = json.loads(path.read_text())
        states = trajectory["states"]
        files = [path.parent / s["atoms"] for s in states]
        tracks = trajectory["atoms"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(path, f"not a readable atomsplat trajectory ({type(err).__name__}: {err})") from None
    result = []
    for k, (state, file) in enumerate(zip(states, files)):
        atoms = read_atoms(file)
        track_id = np.full(len(atoms), -1.0)
        moved = np.zeros(len(atoms))
        for track in tracks:
            i = track["index"][k] if k < len(track["index"]) else None
            if i is None:
                continue
            track_id[i] = track["id"]
            moved[i] = next((s["distance_pm"] for s in track.get("steps", []) if s["to_state"] == k), 0.0)
        atoms.columns.update(track_id=track_id, displacement_pm=moved)
        result.append((state["name"], atoms))
    return result
