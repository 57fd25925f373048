"""The likelihood-gain kernel (engine.kernels.evidence) against an independent float64 NumPy model:
each atom's exact Poisson log-likelihood gain, its position Fisher information and score, with the
score also checked as the finite-difference derivative of the gain; on every backend."""

import numpy as np
import pytest

from engine.core.geometry import TiltGeometry, centre_index
from engine.kernels.evidence import LikelihoodGain
from engine.kernels.projector import TiltSeriesProjector

SHAPE, PIXEL = (26, 30), 0.3
AMP, WIDTH = 40.0, 0.45  # counts per projection, footprint σ (Å)


def geometry():
    return TiltGeometry.from_tilt_angles([-50.0, -10.0, 25.0, 60.0], shifts=[[0.1, -0.2], [0, 0], [0.3, 0.1], [0, 0.2]],
                                         axis_angle_deg=4.0)


def atom_counts(position, g=None) -> np.ndarray:
    """Expected counts (n, H, W) of one atom at ``position`` (Å), float64, untruncated."""
    g = g or geometry()
    h, w = SHAPE
    rows, cols = np.mgrid[0:h, 0:w]
    out = np.zeros((len(g), h, w))
    s_px = WIDTH / PIXEL
    for k in range(len(g)):
        q = g.rotations[k] @ position
        col = (q[0] + g.shifts[k][0]) / PIXEL + centre_index(w)
        row = (q[1] + g.shifts[k][1]) / PIXEL + centre_index(h)
        d2 = (cols - col) ** 2 + (rows - row) ** 2
        out[k] = AMP / (2 * np.pi * s_px**2) * np.exp(-d2 / (2 * s_px**2))
    return out


def reference(position, model, counts, add):
    """(gain, Fisher per Å², score per Å) of one atom, derivatives by central differences in float64."""
    def gain_at(p):
        c = atom_counts(p)
        with_atom, without = (model + c, model) if add else (model, model - c)
        return np.sum(counts * np.log(with_atom / without) - (with_atom - without))

    c = atom_counts(position)
    with_atom = model + c if add else model
    h = 1e-5
    dc = np.stack([(atom_counts(position + h * e) - atom_counts(position - h * e)) / (2 * h) for e in np.eye(3)])
    fisher = np.einsum("ikhw,jkhw->ij", dc, dc / with_atom)
    score = np.einsum("ikhw,khw->i", dc, counts / with_atom - 1)
    return gain_at(position), fisher, score


@pytest.mark.parametrize("add", [False, True])
def test_gain_fisher_and_score_match_numpy(arch, add):
    rng = np.random.default_rng(5)
    positions = np.array([[0.4, -0.6, 0.9], [-1.1, 0.8, -0.3]])
    background = 1.5
    model = background + sum(atom_counts(p) for p in positions) if not add else background + atom_counts(positions[1])
    counts = rng.poisson(model + (atom_counts(positions[0]) if add else 0)).astype(np.float64)
    kernel = LikelihoodGain(TiltSeriesProjector(geometry(), SHAPE, PIXEL), capacity=4)
    kernel.set_counts(counts)
    kernel.set_model(model)
    probe = positions[:1] if add else positions
    gain, fisher, score = kernel.run(probe, AMP, WIDTH, add=add)[:3]
    for i, p in enumerate(probe):
        ref_gain, ref_fisher, ref_score = reference(p, model, counts, add)
        assert gain[i] == pytest.approx(ref_gain, rel=2e-4, abs=1e-2)
        np.testing.assert_allclose(fisher[i], ref_fisher, rtol=2e-3, atol=1e-3 * np.abs(ref_fisher).max())
        np.testing.assert_allclose(score[i], ref_score, rtol=2e-3, atol=2e-3 * np.abs(ref_score).max() + 1e-3)


def test_score_is_the_derivative_of_the_gain(arch):
    rng = np.random.default_rng(2)
    model = 1.0 + atom_counts(np.array([1.0, 0.0, 0.0]))
    counts = rng.poisson(model + atom_counts(np.array([-0.5, 0.3, 0.2]))).astype(np.float64)
    kernel = LikelihoodGain(TiltSeriesProjector(geometry(), SHAPE, PIXEL), capacity=8)
    kernel.set_counts(counts)
    kernel.set_model(model)
    p = np.array([-0.45, 0.25, 0.3])
    h = 0.02
    probes = np.concatenate([p[None], p + h * np.eye(3), p - h * np.eye(3)])
    gain, _, score = kernel.run(probes, AMP, WIDTH, add=True)[:3]
    numeric = (gain[1:4] - gain[4:7]) / (2 * h)
    np.testing.assert_allclose(score[0], numeric, rtol=0.02, atol=0.02 * np.abs(numeric).max())
