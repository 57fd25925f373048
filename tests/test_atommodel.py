"""The atom model's chain rule (cloud gradients → position, log-amplitude, log-width) against finite
differences of an independent float64 NumPy model of the rendering, and its Adam steps against a
NumPy Adam; the same Adam steps the alignment (`engine.fit.alignment`)."""

import numpy as np
import pytest
import taichi as ti

from engine.kernels.adam import BETA1, BETA2, EPSILON
from engine.kernels.atommodel import AtomModel, AtomProfile

PROFILE = AtomProfile((0.7, 0.3), (0.0, 0.2))  # a core and a tail 0.45 Å wider in quadrature
N = 3


def dtypes(arch):
    return [ti.f32, ti.f64] if arch == "cpu" else [ti.f32]  # f64 where the backend has it for sure


def numpy_cloud(pos, log_amp, log_sigma):
    """The cloud the model renders: (K·N, 3) positions, amplitudes and widths, component-major."""
    weights, widths = PROFILE.gaussians(np.exp(log_amp), np.exp(log_sigma))
    return np.tile(pos, (PROFILE.components, 1)), weights.T.ravel(), widths.T.ravel()


def linear_loss(coeffs, pos, log_amp, log_sigma):
    """L = Σ_c γ_c·p_c + α_c a_c + β_c s_c over the cloud: its cloud gradients are the coefficients."""
    p, a, s = numpy_cloud(pos, log_amp, log_sigma)
    return np.sum(coeffs[0] * p) + coeffs[1] @ a + coeffs[2] @ s


def model_with_gradients(dtype, state, coeffs):
    model = AtomModel(N, PROFILE, dtype=dtype)
    model.set_state(state)
    c = model.cloud
    k = PROFILE.components * N
    nd = model.numpy_dtype
    pad = c.capacity - k
    c.grad_pos.from_numpy(np.pad(coeffs[0], ((0, pad), (0, 0))).astype(nd))
    c.grad_amp.from_numpy(np.pad(coeffs[1], (0, pad)).astype(nd))
    c.grad_sigma.from_numpy(np.pad(coeffs[2], (0, pad)).astype(nd))
    return model


def random_case(seed):
    rng = np.random.default_rng(seed)
    state = {"pos": rng.uniform(-3, 3, (N, 3)), "amp": rng.uniform(0.5, 2.0, N), "sigma": rng.uniform(0.3, 0.6, N)}
    k = PROFILE.components * N
    coeffs = (rng.normal(size=(k, 3)), rng.normal(size=k), rng.normal(size=k))
    return state, coeffs


def test_render_matches_the_profile(arch):
    for dtype in dtypes(arch):
        state, coeffs = random_case(0)
        model = model_with_gradients(dtype, state, coeffs)
        p, a, s = numpy_cloud(state["pos"], np.log(state["amp"]), np.log(state["sigma"]))
        k = len(a)
        tol = 1e-12 if dtype == ti.f64 else 1e-6
        np.testing.assert_allclose(model.cloud.pos.to_numpy()[:k], p, rtol=tol)
        np.testing.assert_allclose(model.cloud.amp.to_numpy()[:k], a, rtol=tol)
        np.testing.assert_allclose(model.cloud.sigma.to_numpy()[:k], s, rtol=tol)


def test_chain_rule_against_finite_differences(arch):
    for dtype in dtypes(arch):
        state, coeffs = random_case(1)
        model = model_with_gradients(dtype, state, coeffs)
        model.adam_step(0.0, 0.0, 0.0)  # zero rates: only the moments move, m = (1 − β1) g
        kernel_grad = model.get_state()["m"] / (1 - BETA1)  # (N, 5): position, log a, log σ
        params = [state["pos"], np.log(state["amp"]), np.log(state["sigma"])]
        h = 1e-6
        numeric = np.zeros((N, 5))
        for i in range(N):
            for j in range(5):
                plus = [x.copy() for x in params]
                minus = [x.copy() for x in params]
                target = 0 if j < 3 else j - 2
                index = (i, j) if j < 3 else i
                plus[target][index] += h
                minus[target][index] -= h
                numeric[i, j] = (linear_loss(coeffs, *plus) - linear_loss(coeffs, *minus)) / (2 * h)
        rtol = 1e-6 if dtype == ti.f64 else 1e-4
        np.testing.assert_allclose(kernel_grad, numeric, rtol=rtol, atol=rtol * np.abs(numeric).max())


def numpy_adam(params, grads, lrs):
    """Reference Adam, float64: ``grads`` a list of per-step gradients of ``params``."""
    m = np.zeros_like(params)
    v = np.zeros_like(params)
    for t, g in enumerate(grads, start=1):
        m = BETA1 * m + (1 - BETA1) * g
        v = BETA2 * v + (1 - BETA2) * g * g
        params = params - lrs * (m / (1 - BETA1**t)) / (np.sqrt(v / (1 - BETA2**t)) + EPSILON)
    return params


def test_adam_steps_match_numpy(arch):
    for dtype in dtypes(arch):
        state, coeffs = random_case(2)
        model = model_with_gradients(dtype, state, coeffs)
        lrs = np.array([0.02, 0.02, 0.02, 0.05, 0.01])
        grads = []
        for step in range(3):
            # Each step's cloud gradients: the coefficients scaled, so the moments see changing gradients.
            scale = 1.0 + step
            c = model.cloud
            k = PROFILE.components * N
            pad = c.capacity - k
            c.grad_pos.from_numpy(np.pad(coeffs[0] * scale, ((0, pad), (0, 0))).astype(model.numpy_dtype))
            c.grad_amp.from_numpy(np.pad(coeffs[1] * scale, (0, pad)).astype(model.numpy_dtype))
            c.grad_sigma.from_numpy(np.pad(coeffs[2] * scale, (0, pad)).astype(model.numpy_dtype))
            before = model.get_state()
            amp_c = np.exp(np.log(before["amp"]))[None, :] * np.array(PROFILE.weights)[:, None]
            sig_c = np.sqrt(before["sigma"][None, :] ** 2 + np.array(PROFILE.extra_var)[:, None])
            g = np.zeros((N, 5))
            g[:, :3] = (coeffs[0] * scale).reshape(PROFILE.components, N, 3).sum(axis=0)
            g[:, 3] = ((coeffs[1] * scale).reshape(PROFILE.components, N) * amp_c).sum(axis=0)
            g[:, 4] = ((coeffs[2] * scale).reshape(PROFILE.components, N) * before["sigma"] ** 2 / sig_c).sum(axis=0)
            grads.append(g)
            model.adam_step(*lrs[[0, 3, 4]])
        start = np.column_stack([state["pos"], np.log(state["amp"]), np.log(state["sigma"])])
        expected = numpy_adam(start, grads, lrs)
        after = model.get_state()
        got = np.column_stack([after["pos"], np.log(after["amp"]), np.log(after["sigma"])])
        tol = 1e-10 if dtype == ti.f64 else 2e-5  # float32 pow and sqrt of GPU shaders are a few ulp off
        np.testing.assert_allclose(got, expected, atol=tol)
        assert np.all(after["age"] == 3)


def test_adam_of_the_alignment_matches_numpy(arch):
    """The alignment refiner takes the same Adam steps: shifts and angle offsets of the projections
    in the batch move, the others neither move nor age."""
    from engine.fit.alignment import AlignmentRefiner
    from engine.measure.alignment import Alignment

    n = 4
    refiner = AlignmentRefiner(Alignment.identity(n), np.linspace(-30, 30, n))

    class Fields:  # the gradient fields the projector and the loss would leave on the device
        def __init__(self):
            self.grad_shift = ti.Vector.field(2, ti.f32, n)
            self.grad_angle = ti.field(ti.f32, n)
            self.grad_axis_angle = ti.field(ti.f32, n)
            self.grad_scale = ti.field(ti.f32, n)
            self.batch = ti.field(ti.i32, n)
            self.batch_size = 2

    f = Fields()
    rng = np.random.default_rng(3)
    g = rng.normal(size=(n, 4)).astype(np.float32)
    f.grad_shift.from_numpy(g[:, :2].copy())
    f.grad_angle.from_numpy(g[:, 2].copy())
    f.grad_scale.from_numpy(g[:, 3].copy())
    f.grad_axis_angle.from_numpy(np.array([0.5, -0.2, 0.1, 0.3], np.float32))
    f.batch.from_numpy(np.array([1, 3, 0, 0], np.int32))
    refiner.step(f, f, lr_shift=0.01, lr_angle=0.02, lr_intensity=0.03)
    a = refiner.alignment
    lr = np.array([0.01, 0.01, 0.02, 0.03])
    expected = numpy_adam(np.zeros((n, 4)), [g.astype(np.float64)], lr)
    got = np.column_stack([a.shifts, a.angle_offsets, np.log(a.intensity_scale)])
    np.testing.assert_allclose(got[[1, 3]], expected[[1, 3]], atol=2e-5)
    assert not got[[0, 2]].any()
    assert a.axis_angle == pytest.approx(-0.02 * np.sign(-0.2 + 0.3), abs=2e-5)
