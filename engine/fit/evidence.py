"""Which atoms the data support: model-order selection by the evidence, the maximum a posteriori
rule of Fatermans, Van Aert and den Dekker (Ultramicroscopy 2019) for atom detection in counted
images, carried over to a tilt series.

With N exchangeable atoms, each position uniform over the volume V that every projection sees, and
the Laplace approximation of each atom's position integral, the log-evidence of N + 1 atoms exceeds
that of N atoms when the extra atom's log-likelihood gain passes its Occam penalty:

    ΔlogL > log(V / (N + 1)) + ½ log det F − (3/2) log 2π

F the 3 × 3 Fisher information of the atom's position (`engine.kernels.evidence`). Parameters
shared by all atoms (amplitude, width, the backgrounds) contribute the same Occam factor to both
models and cancel. The penalty is never below 0 (an Occam factor is at most 1). A hard-core prior
keeps atoms at least d_min apart (0.7 × the shortest bond of the expected species). Typical
penalties are 7–11 nats for a light atom; a true atom at 14 counts per projection gains 20–40.

The rule is applied three ways: remove every atom that fails it; add the candidates (peaks of the
second-order gain map, refined by Fisher scoring) that pass it; and for every pair closer than one
bond, keep the pair only if it beats the best single atom by the same penalty.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from engine.core.geometry import centre_index
from engine.kernels.volume import local_maxima

SCORING_STEP_LIMIT = 0.5  # Å: longest Fisher-scoring step of a candidate (the expansion is local)


def visible_volume(shape, pixel_size: float) -> float:
    """Å³ that every projection of a single-axis series of images ``shape`` (H, W) px sees: the
    cylinder |(x, z)| ≤ half the image width, |y| ≤ half its height (the atoms' prior volume)."""
    half_h, half_w = (centre_index(v) * pixel_size for v in shape)
    return math.pi * half_w ** 2 * 2 * half_h


def occam_penalty(fisher: np.ndarray, volume: float, n_atoms: int) -> np.ndarray:
    """log(V / N) + ½ log det F − (3/2) log 2π per atom (nats), at least 0: the evidence an atom's
    log-likelihood gain must exceed, F (N, 3, 3) its position Fisher information per Å², V (Å³) its
    prior volume, N the larger model's atom count."""
    sign, logdet = np.linalg.slogdet(fisher)
    logdet = np.where(sign > 0, logdet, np.inf)
    return np.maximum(math.log(volume / max(n_atoms, 1)) + 0.5 * logdet - 1.5 * math.log(2 * math.pi), 0.0)


class EvidenceSelection:
    """gain: a `LikelihoodGain` holding the counts; volume_A3: the prior volume of one atom (Å³);
    in_support: (N, 3) → bool, the prior's support; d_min and bond (Å): the hard core and the
    distance within which pairs are tested against one atom."""

    def __init__(self, gain, volume_A3: float, in_support, d_min: float, bond: float):
        self.gain, self.volume, self.in_support = gain, volume_A3, in_support
        self.d_min, self.bond = d_min, bond

    def penalty(self, fisher: np.ndarray, n_atoms: int) -> np.ndarray:
        """`occam_penalty` of atoms with position Fisher information ``fisher`` (N, 3, 3)."""
        return occam_penalty(fisher, self.volume, n_atoms)

    def significance(self, expected: np.ndarray, pos: np.ndarray, amp: float, width: float):
        """Each atom's log-likelihood gain and its penalty (nats) against the model ``expected``, and
        its position Fisher information (N, 3, 3) per Å²."""
        self.gain.set_model(expected)
        gain, fisher = self.gain.run(pos, amp, width, add=False)[:2]
        return gain, self.penalty(fisher, len(pos)), fisher

    def remove(self, expected, pos, amp, width) -> np.ndarray:
        """Which atoms to drop: those below their penalty, outside the support, and the weaker of any
        two closer than d_min."""
        gain, penalty, _ = self.significance(expected, pos, amp, width)
        margin = gain - penalty
        drop = (margin < 0) | ~self.in_support(pos)
        for i, j in cKDTree(pos).query_pairs(self.d_min) if len(pos) else ():
            if not (drop[i] or drop[j]):
                drop[i if margin[i] < margin[j] else j] = True
        return drop

    def _score_steps(self, candidates: np.ndarray, amp: float, width: float, steps: int) -> np.ndarray:
        """Fisher-scoring steps (Δr = F⁻¹ ∇logL, at most SCORING_STEP_LIMIT) on each candidate's
        position, the model of the last `set_model` held fixed."""
        for _ in range(steps):
            _, fisher, score = self.gain.run(candidates, amp, width, add=True)[:3]
            step = np.linalg.solve(fisher + 1e-9 * np.eye(3), score[:, :, None])[:, :, 0]
            length = np.linalg.norm(step, axis=1, keepdims=True)
            candidates = candidates + step * np.minimum(1.0, SCORING_STEP_LIMIT / np.maximum(length, 1e-12))
        return candidates

    def candidates(self, counts, expected, pos, amp, width, projector, support) -> np.ndarray:
        """Where an atom would gain the most: local maxima of A·S(r) − A²·I(r)/2 > 0 (a second-order
        expansion of the gain of an atom of amplitude A at r; S, Rao's score, is the back-projection
        of the footprint-filtered y/λ − 1, I that of the squared-footprint-filtered 1/λ), at least
        d_min from every atom, on ``projector``'s grid within ``support``."""
        s_px = width / self.gain.pixel_size
        filtered = ndimage.gaussian_filter(counts / expected - 1.0, sigma=(0, s_px, s_px), mode="constant")
        score = projector.backproject(filtered.astype(np.float32)).astype(np.float64)
        # A Gaussian squared is a Gaussian of width s/√2 and sum 1/(4π s²).
        inverse = ndimage.gaussian_filter(1.0 / expected, sigma=(0, s_px / math.sqrt(2), s_px / math.sqrt(2)),
                                          mode="nearest") / (4 * math.pi * s_px * s_px)
        information = projector.backproject(inverse.astype(np.float32)).astype(np.float64)
        quadratic = (amp * score - 0.5 * amp * amp * information) / projector.splat_scale
        found, _ = local_maxima(quadratic, projector, self.d_min, 0.0, support)
        if len(pos) and len(found):
            found = found[cKDTree(pos).query(found)[0] > self.d_min]
        return found

    def add(self, counts, expected, pos, amp, width, projector, support, steps: int = 3) -> np.ndarray:
        """Candidates that pass the rule (best margin first, d_min from atoms and each other)."""
        found = self.candidates(counts, expected, pos, amp, width, projector, support)
        if len(found) == 0:
            return found
        self.gain.set_model(expected)
        found = self._score_steps(found, amp, width, steps)
        gain, fisher = self.gain.run(found, amp, width, add=True)[:2]
        margin = gain - self.penalty(fisher, len(pos) + 1)
        ok = (margin > 0) & self.in_support(found)
        tree = cKDTree(pos) if len(pos) else None
        accepted = []
        for i in np.argsort(-margin):
            if not ok[i]:
                break
            if tree is not None and tree.query(found[i])[0] <= self.d_min:
                continue
            if accepted and np.min(np.linalg.norm(found[accepted] - found[i], axis=1)) <= self.d_min:
                continue
            accepted.append(i)
        return found[accepted]

    def merge(self, counts, expected, render, pos, amp, width, steps: int = 4) -> tuple[np.ndarray, int]:
        """Pairs closer than one bond against the best single atom between them (Fisher-scored from
        the midpoint, the rest held fixed): the pair stays only if it wins by the penalty.
        ``render(positions)`` gives those atoms' expected counts."""
        pairs = sorted(cKDTree(pos).query_pairs(self.bond)) if len(pos) else []
        if not pairs:
            return pos, 0
        gone = np.zeros(len(pos), bool)
        merged = []
        for i, j in pairs:
            if gone[i] or gone[j]:
                continue
            pair = render(pos[[i, j]])
            without = np.maximum(expected - pair, 1e-6)
            seen = pair > 0  # the pair's log-likelihood is a sum over the pixels it reaches
            y, full, rest = counts[seen], expected[seen], without[seen]
            pair_gain = float(np.sum(y * np.log(full / rest) - (full - rest)))
            self.gain.set_model(without)
            single = self._score_steps(0.5 * (pos[i] + pos[j])[None], amp, width, steps)
            gain, fisher = self.gain.run(single, amp, width, add=True)[:2]
            if pair_gain - gain[0] < self.penalty(fisher, len(pos))[0]:
                gone[i] = gone[j] = True
                merged.append(single[0])
        if not merged:
            return pos, 0
        return np.concatenate([pos[~gone], np.array(merged)]), len(merged)
