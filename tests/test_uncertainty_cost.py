"""The vectorised pieces of the per-atom uncertainty pass against plain references: each atom's
position covariance from its neighbourhood's joint information (batched) against a loop over atoms
that assembles and inverts every joint matrix, the observed information's fallback to the Fisher
information where it is not positive definite, and the residual correlation area (FFT) against the
autocorrelation summed by shifted products."""

import numpy as np
import pytest

from engine.fit.seeding import residual_dispersion
from engine.fit.uncertainty import JointInformation, coupled_pairs, information_covariance, position_covariance


def covariance_loop(fisher, pairs, cross, spread=None):
    """The reference: for each atom, the joint information of it and its neighbours (in the order
    of ``pairs``) assembled block by block, inverted, read at the atom; with ``spread`` (own and
    cross blocks of S) the sandwich F⁻¹ S F⁻¹ of the same neighbourhood, where F⁻¹ is positive
    definite at the atom."""
    n, p = fisher.shape[:2]

    def assemble(own, cross_blocks, ring):
        blocks = {}
        for (i, j), block in zip(pairs, cross_blocks):
            blocks[i, j], blocks[j, i] = block, block.T
        joint = np.zeros((len(ring) * p, len(ring) * p))
        for a, u in enumerate(ring):
            for b, v in enumerate(ring):
                block = own[u] if a == b else blocks.get((u, v))
                if block is not None:
                    joint[a * p:(a + 1) * p, b * p:(b + 1) * p] = block
        return joint

    neighbours = [[] for _ in range(n)]
    for i, j in pairs:
        neighbours[i].append(j)
        neighbours[j].append(i)
    out = np.full((n, 3, 3), np.inf)
    for i in range(n):
        ring = [i] + neighbours[i]
        try:
            full = np.linalg.inv(assemble(fisher, cross, ring))
        except np.linalg.LinAlgError:
            continue
        inverse = full[:3, :3]
        if spread is not None:
            if not np.all(np.linalg.eigvalsh(inverse) > 0):
                continue
            inverse = (full @ assemble(*spread, ring) @ full)[:3, :3]
        if np.all(np.isfinite(inverse)) and np.all(np.diag(inverse) > 0):
            out[i] = inverse
    return out


def test_position_covariance_matches_the_loop():
    rng = np.random.default_rng(3)
    for n, p, radius in [(1, 5, 3.0), (40, 5, 3.0), (150, 3, 2.5)]:
        positions = rng.uniform(0.0, 8.0, (n, 3))
        pairs = coupled_pairs(positions, radius)
        fisher = np.stack([a @ a.T + p * np.eye(p) for a in rng.normal(size=(n, p, p))])
        cross = 0.3 * rng.normal(size=(len(pairs), p, p))
        np.testing.assert_allclose(position_covariance(fisher, pairs, cross), covariance_loop(fisher, pairs, cross),
                                   rtol=1e-10)
        np.testing.assert_allclose(position_covariance(fisher), covariance_loop(fisher, [], []), rtol=1e-10)
        spread = (np.stack([a @ a.T for a in rng.normal(size=(n, p, p))]), 0.2 * rng.normal(size=(len(pairs), p, p)))
        spread[0][0] *= 0.0  # nothing spread at atom 0 (its σ then comes from its neighbours' spread alone)
        fisher[-1] = -np.eye(p)  # a saddle: no sandwich there
        expected = covariance_loop(fisher, pairs, cross, spread)
        assert np.isinf(expected[-1]).all() or n == 1
        np.testing.assert_allclose(position_covariance(fisher, pairs, cross, spread), expected, rtol=1e-9)
    fisher[2] = 0.0  # an atom without information: singular wherever it takes part
    singular = np.isinf(covariance_loop(fisher, pairs, cross)).all(axis=(1, 2))
    assert singular[2]
    got = position_covariance(fisher, pairs, cross)
    np.testing.assert_array_equal(np.isinf(got).all(axis=(1, 2)), singular)
    np.testing.assert_allclose(got[~singular], covariance_loop(fisher, pairs, cross)[~singular], rtol=1e-10)


def test_correlation_area_is_the_summed_autocorrelation():
    rng = np.random.default_rng(4)
    for shape, lag in [((3, 17, 23), 4), ((2, 9, 12), 1)]:
        noise = rng.normal(size=shape)
        noise[:, 1:, :] += 0.6 * noise[:, :-1, :]  # correlated along rows and columns
        noise[:, :, 1:] += 0.4 * noise[:, :, :-1]
        centred = noise - noise.mean(axis=(1, 2), keepdims=True)
        h, w = shape[1:]
        total = 0.0
        for dy in range(-lag, lag + 1):
            for dx in range(-lag, lag + 1):
                a = centred[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)]
                b = centred[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
                total += np.sum(a * b)
        variance, area = residual_dispersion(noise, lag)
        assert variance == np.mean(centred ** 2)
        assert area > 1.5  # the correlation is seen
        assert area == pytest.approx(total / np.sum(centred ** 2), rel=1e-12)
        assert residual_dispersion(noise.astype(np.float32), lag)[1] == pytest.approx(area, rel=1e-6)
    assert residual_dispersion(np.zeros((2, 5, 5))) == (0.0, 1.0)


def test_no_atoms_give_empty_answers(arch):
    from engine.core.geometry import TiltGeometry
    from engine.kernels.evidence import LikelihoodGain
    from engine.kernels.projector import TiltSeriesProjector

    kernel = LikelihoodGain(TiltSeriesProjector(TiltGeometry.from_tilt_angles([-30.0, 30.0]), (12, 12), 0.3),
                            "gaussian", free_shape=True)
    kernel.set_counts(np.ones((2, 12, 12)))
    kernel.set_model(np.ones((2, 12, 12)))
    gain, fisher, score = kernel.evaluate(np.zeros((0, 3)), 1.0, 0.4)[:3]
    assert gain.shape == (0,) and fisher.shape == (0, 5, 5) and score.shape == (0, 5)


def test_observed_information_gives_way_to_fisher_where_not_positive_definite():
    """σ come from the observed information; an atom whose observed neighbourhood information is not
    positive definite (the likelihood not concave there) takes the Fisher information's instead."""
    rng = np.random.default_rng(6)
    n, p = 30, 3
    positions = rng.uniform(0.0, 8.0, (n, 3))
    pairs = coupled_pairs(positions, 2.5)
    fisher = np.stack([a @ a.T + p * np.eye(p) for a in rng.normal(size=(n, p, p))])
    cross = 0.2 * rng.normal(size=(len(pairs), p, p))
    observed = fisher * rng.uniform(0.6, 1.4, (n, 1, 1))
    observed[4] = -np.eye(p)  # atom 4: a saddle
    information = JointInformation(np.zeros(n), fisher, pairs, cross, observed, cross)
    covariance, fallback = information_covariance(information)
    inverse = position_covariance(observed, pairs, cross)  # infinite where singular
    concave = np.all(np.isfinite(inverse), axis=(1, 2))
    concave[concave] = np.linalg.eigvalsh(inverse[concave]).min(axis=1) > 0
    assert fallback == np.sum(~concave) >= 1 and not concave[4]
    np.testing.assert_allclose(covariance[concave], inverse[concave], rtol=1e-12)
    np.testing.assert_allclose(covariance[~concave], position_covariance(fisher, pairs, cross)[~concave], rtol=1e-12)
