"""Per-atom uncertainties: the observed and the Fisher information of the likelihood-gain kernel
(engine.kernels.evidence) against a float64 NumPy finite-difference Hessian of the log-likelihood
(3 atoms, both noise models, position, amplitude and width, at noise-free and at noisy data), the
Cramér–Rao bound of `plan` (1/√dose for counts), and the `plan` command."""

import json

import numpy as np
import pytest

from engine.core.geometry import TiltGeometry, centre_index
from engine.kernels.atommodel import AtomProfile
from engine.kernels.evidence import LikelihoodGain
from engine.kernels.projector import TiltSeriesProjector, supports_float64

SHAPE, PIXEL, BLUR = (28, 30), 0.3, 0.25
ATOMS = np.array([[0.4, -0.6, 0.9], [-1.1, 0.8, -0.3], [0.9, 0.7, -0.8]])  # Å
LOG_AMP = np.log([60.0, 45.0, 80.0])  # image units · Å²
LOG_WIDTH = np.log([0.35, 0.42, 0.3])  # Å
FACTOR = np.array([1.0, 0.9, 1.1, 1.05])  # per-projection intensity scale
VARIANCE = np.array([4.0, 5.0, 3.0, 6.0])  # Gaussian noise variance per projection


def geometry():
    return TiltGeometry.from_tilt_angles([-50.0, -10.0, 25.0, 60.0], shifts=[[0.1, -0.2], [0, 0], [0.3, 0.1], [0, 0.2]],
                                         axis_angle_deg=4.0)


def render(params, profile, g) -> np.ndarray:
    """Images (n, H, W) of atoms with parameters (N, 5): x, y, z Å, log a, log σ; float64, untruncated."""
    h, w = SHAPE
    rows, cols = np.mgrid[0:h, 0:w]
    out = np.zeros((len(g), h, w))
    for x, y, z, log_a, log_s in params:
        for k in range(len(g)):
            q = g.rotations[k] @ np.array([x, y, z])
            col = (q[0] + g.shifts[k][0]) / PIXEL + centre_index(w)
            row = (q[1] + g.shifts[k][1]) / PIXEL + centre_index(h)
            d2 = ((cols - col) ** 2 + (rows - row) ** 2) * PIXEL**2
            for weight, extra in zip(profile.weights, profile.extra_var):
                s2 = np.exp(2 * log_s) + extra + BLUR**2
                out[k] += FACTOR[k] * np.exp(log_a) * weight / (2 * np.pi * s2) * np.exp(-d2 / (2 * s2))
    return out


def negative_log_likelihood(noise, model, data):
    if noise == "poisson":
        return float(np.sum(model - data * np.log(model)))
    return float(np.sum((data - model) ** 2 / (2 * VARIANCE[:, None, None])))


@pytest.mark.parametrize("noise,profile", [("poisson", AtomProfile()),
                                           ("gaussian", AtomProfile((0.7, 0.3), (0.0, 0.2)))])
@pytest.mark.parametrize("noisy", [False, True], ids=["noise-free", "noisy"])
def test_fisher_is_the_hessian_of_the_log_likelihood(arch, noise, profile, noisy):
    """The observed information, the Hessian of −log L at the parameters and the data, against
    central differences, each atom's 5 × 5 block and each coupled pair's; the score against the
    gradient, the gain against the likelihood ratio. At noise-free data (y = the model) the Fisher
    information is that Hessian too; at noisy data it is not, and the observed information is."""
    dtype = np.float64 if supports_float64() else np.float32
    g = geometry()
    params = np.column_stack([ATOMS, LOG_AMP, LOG_WIDTH])
    background = 2.0
    model = background + render(params, profile, g)
    data = model
    if noisy:  # a low dose: about 2 counts a pixel, or noise of a fifth of the peak
        rng = np.random.default_rng(5)
        data = (rng.poisson(model).astype(np.float64) if noise == "poisson"
                else model + rng.normal(size=model.shape) * np.sqrt(VARIANCE)[:, None, None])
    # Two entries a launch: 3 atoms and 2 pairs take three launches, one holding an atom and a pair.
    kernel = LikelihoodGain(TiltSeriesProjector(g, SHAPE, PIXEL, BLUR, dtype=dtype), noise, profile, free_shape=True,
                            capacity=2)
    kernel.set_counts(data)
    kernel.set_model(model)
    kernel.set_factor(FACTOR)
    kernel.set_noise_variance(VARIANCE)
    pairs = np.array([[0, 1], [2, 1]])
    moments = kernel.evaluate(ATOMS, np.exp(LOG_AMP), np.exp(LOG_WIDTH), pairs=pairs, observed=True)
    step = 1e-3
    tolerance = 1e-4 if dtype == np.float64 else 2e-3

    def nll(i, delta_i, j=None, delta_j=None):
        moved = params.copy()
        moved[i] += delta_i
        if j is not None:
            moved[j] += delta_j
        return negative_log_likelihood(noise, background + render(moved, profile, g), data)

    def hessian(i, j):
        """The block ∂²(−log L)/∂θ_i ∂θ_j by central differences."""
        out = np.zeros((5, 5))
        for a in range(5):
            for b in range(5):
                ea, eb = step * np.eye(5)[a], step * np.eye(5)[b]
                out[a, b] = (nll(i, ea, j, eb) - nll(i, ea, j, -eb) - nll(i, -ea, j, eb) + nll(i, -ea, j, -eb)) / (4 * step**2)
        return out

    for i in range(len(ATOMS)):
        own = hessian(i, i)
        scale = np.abs(own).max()
        np.testing.assert_allclose(moments.observed[i], own, rtol=tolerance, atol=tolerance * scale)
        if noisy:  # the Fisher information is the Hessian's expectation, not the Hessian
            assert np.abs(moments.fisher[i] - own).max() > 5 * np.abs(moments.observed[i] - own).max()
        else:
            np.testing.assert_allclose(moments.fisher[i], own, rtol=tolerance, atol=tolerance * scale)
        gradient = [(nll(i, step * e) - nll(i, -step * e)) / (2 * step) for e in np.eye(5)]
        # (to the footprint's truncation, which the width's derivative, weighting the tails, feels most)
        np.testing.assert_allclose(moments.score[i], -np.array(gradient), rtol=3e-3, atol=tolerance * np.sqrt(scale))
        # The gain of keeping atom i against removing it, exactly.
        without = np.delete(params, i, axis=0)
        reference = negative_log_likelihood(noise, background + render(without, profile, g), data) - nll(i, 0.0)
        assert moments.gain[i] == pytest.approx(reference, rel=tolerance, abs=tolerance)
    for (i, j), block, observed in zip(pairs, moments.cross, moments.observed_cross):  # overlapping atoms' coupling
        reference = hessian(i, j)
        assert np.abs(reference).max() > 0.01 * np.abs(moments.fisher[i]).max()  # they do overlap
        np.testing.assert_allclose(observed, reference, rtol=tolerance, atol=tolerance * np.abs(moments.fisher[i]).max())
        if not noisy:
            np.testing.assert_allclose(block, reference, rtol=tolerance, atol=tolerance * np.abs(moments.fisher[i]).max())
    if noise != "poisson":
        assert moments.spread is None  # a Gaussian fit reads its noise off its residual instead
        return

    def jacobian(i):
        """∂λ/∂θ_i (5, pixels) by central differences of the rendered image."""
        columns = []
        for e in step * np.eye(5):
            up, down = params.copy(), params.copy()
            up[i] += e
            down[i] -= e
            columns.append(((render(up, profile, g) - render(down, profile, g)) / (2 * step)).ravel())
        return np.array(columns)

    # The scores' spread Σ_p (y − λ)²/λ² ∇λ ∇λᵀ, own and cross blocks; zero where the data are the model.
    jacobians, weight = [jacobian(i) for i in range(len(ATOMS))], ((data - model) / model).ravel() ** 2
    for (i, j), block in zip([(i, i) for i in range(len(ATOMS))] + [tuple(p) for p in pairs],
                             list(moments.spread) + list(moments.spread_cross)):
        reference = (jacobians[i] * weight) @ jacobians[j].T
        scale = np.abs(moments.fisher[i]).max()
        assert (np.abs(reference).max() > 0.01 * scale) == noisy
        np.testing.assert_allclose(block, reference, rtol=tolerance, atol=tolerance * scale)


def test_written_covariance_is_the_joint_sandwich_and_its_ellipsoid_covers_95(arch):
    """atom_columns' σ and off-diagonal columns rebuild each atom's 3 × 3 position block of the
    joint sandwich H⁻¹ S H⁻¹ (counts: observed information H, scores' spread S; all three atoms
    coupled: a NumPy float64 assembly of the kernel's blocks); with tilts on one side of the beam
    x and z do correlate, so errors drawn from those covariances fall inside the full-matrix 95 %
    ellipsoid 95 % of the time and the axes' σ alone (Σ (e/σ)² ≤ χ²₃) would cover a different
    fraction."""
    import importlib.util
    from pathlib import Path

    from engine.fit.uncertainty import atom_columns, covariance_of, joint_information

    dtype = np.float64 if supports_float64() else np.float32
    g = TiltGeometry.from_tilt_angles([10.0, 25.0, 40.0, 55.0], axis_angle_deg=20.0)  # a wedge around 32°
    profile = AtomProfile()
    params = np.column_stack([ATOMS, LOG_AMP, LOG_WIDTH])
    model = 20.0 + 20.0 * render(params, profile, g)  # many counts: the observed information is positive definite
    kernel = LikelihoodGain(TiltSeriesProjector(g, SHAPE, PIXEL, BLUR, dtype=dtype), "poisson", profile, free_shape=True)
    kernel.set_counts(np.random.default_rng(3).poisson(model))
    kernel.set_model(model)
    kernel.set_factor(20.0 * FACTOR)
    columns, used = atom_columns(joint_information(kernel, ATOMS, np.exp(LOG_AMP), np.exp(LOG_WIDTH), 10.0), 100.0)
    assert used == {"kind": "sandwich: observed information, scores' spread", "atoms_with_fisher_instead": 0}
    pairs = np.array([[0, 1], [0, 2], [1, 2]])
    moments = kernel.evaluate(ATOMS, np.exp(LOG_AMP), np.exp(LOG_WIDTH), pairs=pairs, observed=True)

    def joint(own, cross):
        out = np.zeros((15, 15))
        for i in range(3):
            out[5 * i:5 * i + 5, 5 * i:5 * i + 5] = own[i]
        for (i, j), block in zip(pairs, cross):
            out[5 * i:5 * i + 5, 5 * j:5 * j + 5], out[5 * j:5 * j + 5, 5 * i:5 * i + 5] = block, block.T
        return out

    inverse = np.linalg.inv(joint(moments.observed, moments.observed_cross))
    sandwich = inverse @ joint(moments.spread, moments.spread_cross) @ inverse
    covariance = covariance_of(columns)
    for i in range(3):
        np.testing.assert_allclose(covariance[i], sandwich[5 * i:5 * i + 3, 5 * i:5 * i + 3], rtol=1e-3 if dtype == np.float64 else 2e-2,
                                   atol=1e-3 * sandwich[5 * i, 5 * i])
        # The model is right here: the sandwich is the inverse information, to within the noise.
        np.testing.assert_allclose(np.diag(covariance[i]), np.diag(inverse)[5 * i:5 * i + 3], rtol=0.35)
    sigma = np.sqrt(np.diagonal(covariance, axis1=1, axis2=2))
    correlation = np.abs(covariance[:, 0, 2]) / (sigma[:, 0] * sigma[:, 2])
    assert correlation.min() > 0.5  # x and z are correlated here: the wedge is not about the beam
    spec = importlib.util.spec_from_file_location("uncertainty_check", Path(__file__).resolve().parents[1] / "scripts"
                                                  / "uncertainty_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    rng = np.random.default_rng(0)
    atom = int(np.argmax(correlation))
    cov = np.repeat(covariance[atom][None], 20000, axis=0)
    errors = rng.multivariate_normal(np.zeros(3), covariance[atom], size=len(cov))
    scored = check.calibration(errors, np.repeat(sigma[atom][None], len(cov), axis=0), cov)
    assert scored["coverage_95"] == pytest.approx(0.95, abs=0.005)
    assert abs(scored["coverage_95_diagonal"] - 0.95) > 0.01


def tiny_structure():
    from engine.io.atoms import Atoms

    return Atoms(np.array(["Si", "Si", "Si"]), np.array([[0.0, 0.0, 0.0], [2.3, 0.4, -0.5], [-1.2, -1.9, 1.4]]))


def test_bound_shrinks_as_one_over_root_dose(arch):
    """Counted data: the Fisher information grows with the dose, so σ ∝ 1/√dose, atom by atom;
    Gaussian noise: σ ∝ the noise σ."""
    from engine.core.geometry import TiltGeometry
    from engine.fit.plan import cramer_rao

    g = TiltGeometry.from_tilt_angles(np.arange(-60.0, 61.0, 15.0))
    structure = tiny_structure()
    low, high = (cramer_rao(structure, g, (40, 40), 0.25, 0.35, counts_per_atom=dose, background=dose / 20)
                 for dose in (10.0, 40.0))
    assert np.all(np.isfinite(low["sigma_A"])) and low["rmsd_pm"] > 0
    np.testing.assert_allclose(high["sigma_A"], low["sigma_A"] / 2, rtol=1e-3)
    quiet, loud = (cramer_rao(structure, g, (40, 40), 0.25, 0.35, noise=n) for n in (0.01, 0.03))
    np.testing.assert_allclose(loud["sigma_A"], 3 * quiet["sigma_A"], rtol=1e-3)
    # The missing wedge (±60°) leaves z the least certain.
    assert low["rmsd_axis_pm"]["z"] > low["rmsd_axis_pm"]["x"]


@pytest.mark.slow
def test_plan_command(tmp_path, capsys):
    """`atomsplat plan` from flags and like a series: the table, the dose for a target, JSON; bad
    input is one line."""
    from engine.cli import main
    from engine.io.atoms import write_atoms
    from engine.io.tiltseries import write_tilt_series
    from engine.physics.simulate import simulate_tilt_series

    structure = tmp_path / "s.xyz"
    write_atoms(tiny_structure(), structure)
    args = ["plan", str(structure), "--tilts=-60:60:15", "--pixel", "0.25", "--shape", "40", "40", "--arch", "cpu"]
    assert main(args + ["--counts-per-atom", "20", "--background", "1", "--target", "5pm", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "poisson" and len(result["sigma_A"]) == 3
    needed = result["needed"]["counts_per_atom"]
    assert needed == pytest.approx(20 * (result["rmsd_pm"] / 5) ** 2)
    series = simulate_tilt_series(tiny_structure(), np.arange(-60.0, 61.0, 15.0), 0.25, (40, 40), blur_sigma=0.35,
                                  noise=0.02, seed=1)
    write_tilt_series(series, tmp_path / "series.npz")
    assert main(["plan", str(structure), "--like", str(tmp_path / "series.npz"), "--arch", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Gaussian noise" in out and "Cramer-Rao RMSD" in out
    assert main(args) == 2  # no dose, no noise
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("atomsplat: error: --counts-per-atom")
