"""The Gaussian projector against a plain NumPy float64 model of the same physics.

The reference below re-derives everything from GEOMETRY.md (R_y, pixel centres) without the engine's
geometry module, evaluates every Gaussian on every pixel (no recurrences; no truncation unless asked
for), and gives both the images and their analytic gradients. Finite differences check the reference,
and check the real kernels twice: the float32 kernels against differences of the reference (loose,
float32 rounding), the float64 kernels against differences of themselves (tight: the adjoint is the
exact derivative of the truncated forward model).
"""

import numpy as np
import pytest
import taichi as ti

from engine.core.geometry import TiltGeometry, tilt_rotation
from engine.kernels.projector import (FLOAT64_UNSUPPORTED, TRUNCATION_RADIUS_SIGMAS, TRUNCATION_RELATIVE_ERROR,
                                      GaussianCloud, TiltSeriesProjector, pack_images, project_tilt_series,
                                      project_tilt_series_adjoint, supports_float64, unpack_images)

FLOAT64_RTOL = 1e-7  # float64 kernels against their own central differences, relative to the largest


def require_float64(arch):
    if not supports_float64(arch):
        pytest.skip(FLOAT64_UNSUPPORTED)


def rot_y(theta_deg):
    t = np.deg2rad(theta_deg)
    return np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])


def rot_z(phi_deg):
    t = np.deg2rad(phi_deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])


def reference(pos, amp, sig, angles, shifts, shape, ps, blur, image_grad=None, axis_deg=None, truncate=False):
    """Images (n, H, W) and, given dL/dimage, gradients of L = Σ image_grad · images.

    ``axis_deg`` (n,): each projection's in-plane tilt-axis angle φ, R = R_z(φ) R_y(θ) R_z(−φ);
    the analytic 'angle' gradient holds for φ = 0 only. ``truncate``: drop every pixel outside the
    square |dx|, |dy| ≤ R s of each footprint, as the kernels do (R = TRUNCATION_RADIUS_SIGMAS)."""
    h, w = shape
    xs = (np.arange(w) - (w - 1) / 2) * ps
    ys = (np.arange(h) - (h - 1) / 2) * ps
    s2 = sig**2 + blur**2
    images = np.zeros((len(angles), h, w))
    grads = {"pos": np.zeros_like(pos), "amp": np.zeros_like(amp), "sigma": np.zeros_like(sig),
             "shift": np.zeros((len(angles), 2)), "angle": np.zeros(len(angles))}
    for k, theta in enumerate(angles):
        phi = 0.0 if axis_deg is None else axis_deg[k]
        rot = rot_z(phi) @ rot_y(theta) @ rot_z(-phi)
        drot = np.deg2rad(1.0) * np.array([[-np.sin(np.deg2rad(theta)), 0, np.cos(np.deg2rad(theta))],
                                           [0, 0, 0], [0, 0, 0]])  # d(R p)_x / dθ per degree
        for g in range(len(pos)):
            q = rot @ pos[g]
            dx = xs[None, :] - (q[0] + shifts[k, 0])
            dy = ys[:, None] - (q[1] + shifts[k, 1])
            e = np.exp(-(dx**2 + dy**2) / (2 * s2[g])) / (2 * np.pi * s2[g])
            if truncate:
                reach = TRUNCATION_RADIUS_SIGMAS * np.sqrt(s2[g])
                e = e * ((np.abs(dx) <= reach) & (np.abs(dy) <= reach))
            images[k] += amp[g] * e
            if image_grad is None:
                continue
            gk = image_grad[k]
            du = amp[g] * np.sum(gk * e * dx) / s2[g]
            dv = amp[g] * np.sum(gk * e * dy) / s2[g]
            ds2 = amp[g] * np.sum(gk * e * (-1 / s2[g] + (dx**2 + dy**2) / (2 * s2[g] ** 2)))
            grads["amp"][g] += np.sum(gk * e)
            grads["pos"][g] += du * rot[0] + dv * rot[1]
            grads["sigma"][g] += ds2 * 2 * sig[g]
            grads["shift"][k] += [du, dv]
            grads["angle"][k] += du * (drot[0] @ pos[g])
    return images, grads


def central_differences(function, value: np.ndarray, h: float) -> np.ndarray:
    """d function / d value, element by element, by central differences of step h."""
    fd = np.zeros_like(value)
    for idx in np.ndindex(value.shape):
        step = np.zeros_like(value)
        step[idx] = h
        fd[idx] = (function(value + step) - function(value - step)) / (2 * h)
    return fd


def random_problem(seed, n=7, shape=(26, 21), ps=0.3, blur=0.3):
    rng = np.random.default_rng(seed)
    half = np.array([shape[1], shape[0], shape[1]]) * ps / 2
    pos = rng.uniform(-half, half, (n, 3))
    pos[0] = [half[0] - 0.2, 0.0, 0.0]  # straddles the right edge at 0°
    pos[1] = pos[2] + [0.25, -0.1, 0.2]  # overlaps its neighbour
    amp = rng.uniform(0.5, 2.0, n)
    sig = rng.uniform(0.25, 0.55, n)
    angles = np.array([-63.0, -8.0, 0.0, 41.0])
    shifts = rng.uniform(-0.4, 0.4, (len(angles), 2))
    return pos, amp, sig, angles, shifts, shape, ps, blur


def engine_call(fn, pos, amp, sig, angles, shifts, shape, ps, blur, *extra, **kw):
    geometry = TiltGeometry.from_tilt_angles(angles, shifts)
    return fn(pos, amp, sig, geometry, shape, ps, *extra, blur_sigma=blur, **kw)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forward_matches_numpy_reference(arch, seed):
    problem = random_problem(seed)
    ref, _ = reference(*problem)
    got = engine_call(project_tilt_series, *problem)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-5 * ref.max()


def test_wide_gaussians_use_several_column_chunks(arch):
    # σ = 2.5 Å at 0.2 Å pixels: footprints of ~120 px span many 8-pixel blocks and chunks.
    pos, amp, sig, angles, shifts, _, _, blur = random_problem(3, n=3)
    sig = np.array([2.5, 1.2, 0.4])
    problem = (pos, amp, sig, angles, shifts, (40, 130), 0.2, blur)
    ref, ref_grads = reference(*problem, image_grad=np.ones((4, 40, 130)))
    got = engine_call(project_tilt_series, *problem)
    assert np.abs(got - ref).max() <= 1e-5 * ref.max()
    grads = engine_call(project_tilt_series_adjoint, *problem, np.ones((4, 40, 130)))
    for name in ("pos", "amp", "sigma"):
        scale = np.abs(ref_grads[name]).max()
        assert np.abs(grads[name] - ref_grads[name]).max() <= 1e-3 * scale, name


def test_truncation_error_is_within_stated_bound(arch):
    # One Gaussian at a pixel centre: the largest dropped value is that at the footprint's edge.
    problem = (np.zeros((1, 3)), np.ones(1), np.array([0.5]), np.array([0.0]), np.zeros((1, 2)), (61, 61), 0.1, 0.0)
    ref, _ = reference(*problem)
    got = engine_call(project_tilt_series, *problem)
    err = np.abs(got - ref).max() / ref.max()
    assert err <= TRUNCATION_RELATIVE_ERROR * 1.01
    assert err > 0.1 * TRUNCATION_RELATIVE_ERROR  # the footprint really is truncated where stated


@pytest.mark.parametrize("seed", [0, 1])
def test_gradients_match_numpy_reference(arch, seed):
    problem = random_problem(seed)
    shape = problem[5]
    image_grad = np.random.default_rng(seed + 10).normal(size=(4,) + shape)
    _, ref = reference(*problem, image_grad=image_grad)
    got = engine_call(project_tilt_series_adjoint, *problem, image_grad)
    for name in ("pos", "amp", "sigma", "shift", "angle"):
        scale = np.abs(ref[name]).max()
        assert np.abs(got[name] - ref[name]).max() <= 1e-3 * scale, name


def test_numpy_reference_gradients_match_finite_differences():
    pos, amp, sig, angles, shifts, shape, ps, blur = random_problem(5, n=4)
    image_grad = np.random.default_rng(3).normal(size=(4,) + shape)
    _, grads = reference(pos, amp, sig, angles, shifts, shape, ps, blur, image_grad)

    def loss(p=pos, a=amp, s=sig, ang=angles, sh=shifts):
        return np.sum(image_grad * reference(p, a, s, ang, sh, shape, ps, blur)[0])

    h = 1e-6
    for name, value, call in [("pos", pos, lambda v: loss(p=v)), ("amp", amp, lambda v: loss(a=v)),
                              ("sigma", sig, lambda v: loss(s=v)), ("angle", angles, lambda v: loss(ang=v)),
                              ("shift", shifts, lambda v: loss(sh=v))]:
        fd = central_differences(call, value, h)
        assert np.abs(fd - grads[name]).max() <= 1e-6 * np.abs(fd).max(), name


def test_kernel_gradients_match_finite_differences(arch):
    pos, amp, sig, angles, shifts, shape, ps, blur = random_problem(7, n=5)
    image_grad = np.random.default_rng(8).normal(size=(4,) + shape)
    got = engine_call(project_tilt_series_adjoint, pos, amp, sig, angles, shifts, shape, ps, blur, image_grad)

    def loss(p=pos, a=amp, s=sig, ang=angles, sh=shifts):
        return np.sum(image_grad * reference(p, a, s, ang, sh, shape, ps, blur)[0])

    h = 1e-5
    for name, value, call in [("pos", pos, lambda v: loss(p=v)), ("sigma", sig, lambda v: loss(s=v)),
                              ("angle", angles, lambda v: loss(ang=v)), ("shift", shifts, lambda v: loss(sh=v))]:
        fd = central_differences(call, value, h)
        assert np.abs(got[name] - fd).max() <= 1e-3 * np.abs(fd).max(), name


def test_tilt_axis_gradients_match_finite_differences(arch):
    # A series whose tilt axis is turned 7° in the image plane: shifts, tilt-angle offsets (about the
    # turned axis) and the axis angle φ itself, each projection's share of dL/dφ on its own.
    pos, amp, sig, angles, shifts, shape, ps, blur = random_problem(9, n=5)
    phi = np.full(len(angles), 7.0)
    image_grad = np.random.default_rng(10).normal(size=(4,) + shape)
    geometry = TiltGeometry.from_tilt_angles(angles, shifts, axis_angle_deg=7.0)
    got = project_tilt_series_adjoint(pos, amp, sig, geometry, shape, ps, image_grad, blur)

    def loss(ang=angles, sh=shifts, ph=phi):
        return np.sum(image_grad * reference(pos, amp, sig, ang, sh, shape, ps, blur, axis_deg=ph)[0])

    h = 1e-5
    for name, value, call in [("angle", angles, lambda v: loss(ang=v)), ("shift", shifts, lambda v: loss(sh=v)),
                              ("axis_angle", phi, lambda v: loss(ph=v))]:
        fd = central_differences(call, value, h)
        assert np.abs(got[name] - fd).max() <= 1e-3 * np.abs(fd).max(), name


def test_adjoint_identity_for_amplitudes(arch):
    pos, amp, sig, angles, shifts, shape, ps, blur = random_problem(11, n=9)
    rng = np.random.default_rng(12)
    x = rng.uniform(0.1, 1.0, len(pos))
    y = rng.normal(size=(4,) + shape)
    ax = engine_call(project_tilt_series, pos, x, sig, angles, shifts, shape, ps, blur)
    aty = engine_call(project_tilt_series_adjoint, pos, x, sig, angles, shifts, shape, ps, blur, y)["amp"]
    lhs, rhs = np.sum(ax * y), np.sum(x * aty)
    assert abs(lhs - rhs) <= 1e-5 * np.sqrt(np.sum(ax**2) * np.sum(y**2))


def test_minibatch_equals_full_series(arch):
    pos, amp, sig, angles, shifts, shape, ps, blur = random_problem(13)
    geometry = TiltGeometry.from_tilt_angles(angles, shifts)
    full = project_tilt_series(pos, amp, sig, geometry, shape, ps, blur)
    part = project_tilt_series(pos, amp, sig, geometry, shape, ps, blur, indices=[3, 1])
    np.testing.assert_allclose(part, full[[3, 1]], rtol=0, atol=1e-6 * full.max())
    image_grad = np.random.default_rng(1).normal(size=(4,) + shape)
    g_part = project_tilt_series_adjoint(pos, amp, sig, geometry, shape, ps, image_grad[[3, 1]], blur, indices=[3, 1])
    mask = np.zeros_like(image_grad)
    mask[[1, 3]] = image_grad[[1, 3]]
    g_full = project_tilt_series_adjoint(pos, amp, sig, geometry, shape, ps, mask, blur)
    for name in ("pos", "amp", "sigma"):
        np.testing.assert_allclose(g_part[name], g_full[name], rtol=1e-5, atol=1e-6 * np.abs(g_full[name]).max())
    np.testing.assert_allclose(g_part["shift"], g_full["shift"][[3, 1]], rtol=1e-5, atol=1e-6)


def test_gaussians_outside_the_image_contribute_nothing(arch):
    pos = np.array([[50.0, 0.0, 0.0], [0.0, -40.0, 0.0]])
    geometry = TiltGeometry.from_tilt_angles([0.0])
    images = project_tilt_series(pos, np.ones(2), np.full(2, 0.4), geometry, (16, 16), 0.3, 0.3)
    assert np.all(images == 0)
    grads = project_tilt_series_adjoint(pos, np.ones(2), np.full(2, 0.4), geometry, (16, 16), 0.3,
                                        np.ones((1, 16, 16)), 0.3)
    assert np.all(grads["pos"] == 0) and np.all(grads["amp"] == 0)


def test_cpu_results_are_bit_identical_run_to_run(arch):
    if arch != "cpu":
        pytest.skip("determinism is promised on the CPU")
    rng = np.random.default_rng(4)
    pos = rng.uniform(-4, 4, (300, 3))
    geometry = TiltGeometry.from_tilt_angles(np.arange(-60, 61, 15.0))
    cloud = GaussianCloud(300)
    cloud.set(pos, rng.uniform(1, 2, 300), rng.uniform(0.3, 0.5, 300))
    projector = TiltSeriesProjector(geometry, (48, 40), 0.3, 0.3, capacity=300)
    projector.image_grad.from_numpy(pack_images(rng.normal(size=(len(geometry), 48, 40))))
    runs = []
    for _ in range(2):
        projector.forward(cloud)
        projector.backward(cloud)
        runs.append([projector.image.to_numpy(), cloud.grad_pos.to_numpy(), cloud.grad_sigma.to_numpy(),
                     projector.grad_angle.to_numpy()])
    for a, b in zip(*runs):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------------------- float64 kernels

def axis_geometry(angles, shifts, axis_deg):
    """A single-axis geometry whose in-plane tilt-axis angle φ may differ per projection."""
    rotations = np.stack([tilt_rotation(t, p) for t, p in zip(angles, axis_deg)])
    phi = np.deg2rad(axis_deg)
    return TiltGeometry(rotations, shifts, np.stack([-np.sin(phi), np.cos(phi)], -1))


@pytest.mark.parametrize("seed", [0, 1])
def test_float64_forward_matches_truncated_reference(arch, seed):
    # With the same truncation as the kernels, only rounding is left: the float64 path carries no
    # float32 constant or accumulator (those would show at ~1e-7), and the CPU's exp recurrence stays exact.
    require_float64(arch)
    problem = random_problem(seed)
    ref, _ = reference(*problem, truncate=True)
    got = engine_call(project_tilt_series, *problem, dtype=np.float64)
    assert got.dtype == np.float64
    assert np.abs(got - ref).max() <= 1e-12 * ref.max()


@pytest.mark.parametrize("seed, axis", [(7, 0.0), (9, 7.0)])
def test_float64_kernel_gradients_match_finite_differences(arch, seed, axis):
    # Central differences of the float64 forward kernel against the float64 adjoint: positions,
    # amplitudes, widths, shifts, tilt-angle offsets, and each projection's share of dL/dφ (its own φ
    # moved alone), for a series with the tilt axis along +y and one turned by 7°.
    require_float64(arch)
    pos, amp, sig, angles, shifts, shape, ps, blur = random_problem(seed, n=5)
    phi = np.full(len(angles), axis)
    image_grad = np.random.default_rng(seed + 1).normal(size=(4,) + shape)
    got = project_tilt_series_adjoint(pos, amp, sig, axis_geometry(angles, shifts, phi), shape, ps, image_grad, blur,
                                      dtype=np.float64)

    def loss(p=pos, a=amp, s=sig, ang=angles, sh=shifts, ph=phi):
        images = project_tilt_series(p, a, s, axis_geometry(ang, sh, ph), shape, ps, blur, dtype=np.float64)
        return np.sum(image_grad * images)

    h = 1e-5
    for name, value, call in [("pos", pos, lambda v: loss(p=v)), ("amp", amp, lambda v: loss(a=v)),
                              ("sigma", sig, lambda v: loss(s=v)), ("shift", shifts, lambda v: loss(sh=v)),
                              ("angle", angles, lambda v: loss(ang=v)), ("axis_angle", phi, lambda v: loss(ph=v))]:
        fd = central_differences(call, value, h)
        assert np.abs(got[name] - fd).max() <= FLOAT64_RTOL * np.abs(fd).max(), name


def test_float64_adjoint_identity(arch):
    require_float64(arch)
    pos, amp, sig, angles, shifts, shape, ps, blur = random_problem(11, n=9)
    rng = np.random.default_rng(12)
    x = rng.uniform(0.1, 1.0, len(pos))
    y = rng.normal(size=(4,) + shape)
    ax = engine_call(project_tilt_series, pos, x, sig, angles, shifts, shape, ps, blur, dtype=np.float64)
    aty = engine_call(project_tilt_series_adjoint, pos, x, sig, angles, shifts, shape, ps, blur, y,
                      dtype=np.float64)["amp"]
    lhs, rhs = np.sum(ax * y), np.sum(x * aty)
    assert abs(lhs - rhs) <= 1e-13 * np.sqrt(np.sum(ax**2) * np.sum(y**2))


def test_float64_is_refused_where_unsupported(arch):
    if supports_float64(arch):
        cloud = GaussianCloud(4, ti.f64)
        projector = TiltSeriesProjector(TiltGeometry.from_tilt_angles([0.0]), (8, 8), 0.3, dtype=np.float64)
        with pytest.raises(ValueError, match="float32"):  # precisions must match
            projector.forward(GaussianCloud(4))
        assert cloud.dtype == projector.dtype == ti.f64
    else:
        with pytest.raises(ValueError, match="float64"):
            TiltSeriesProjector(TiltGeometry.from_tilt_angles([0.0]), (8, 8), 0.3, dtype=ti.f64)


# ---------------------------------------------------------------------------- rendering outside the batch

def test_render_leaves_the_training_state_alone(arch):
    pos, amp, sig, angles, shifts, shape, ps, blur = random_problem(14)
    geometry = TiltGeometry.from_tilt_angles(angles, shifts)
    cloud = GaussianCloud(len(pos))
    cloud.set(pos, amp, sig)
    projector = TiltSeriesProjector(geometry, shape, ps, blur, capacity=len(pos))
    projector.set_batch([1, 3])
    projector.forward(cloud)
    projector.image_grad.from_numpy(pack_images(np.random.default_rng(2).normal(size=(4,) + shape)))
    projector.backward(cloud)

    def state():
        return [projector.batch.to_numpy(), projector.batch_numpy(), projector.image.to_numpy(),
                projector.image_grad.to_numpy(), projector.grad_shift.to_numpy(), projector.grad_angle.to_numpy(),
                cloud.grad_pos.to_numpy(), cloud.grad_sigma.to_numpy()]

    before = state()
    rendered = projector.render(cloud, [0, 3, 0])
    assert rendered.shape == (3,) + shape and rendered.dtype == np.float32
    for a, b in zip(before, state()):
        assert np.array_equal(a, b)
    assert projector.batch_size == 2
    # the same pixels the training path renders, and a projection the batch never held
    trained = unpack_images(before[2], shape[1])[3]
    if arch == "cpu":
        assert np.array_equal(rendered[1], trained)
    else:  # GPUs scatter with atomics, in no fixed order
        np.testing.assert_allclose(rendered[1], trained, rtol=0, atol=1e-6 * trained.max())
    assert np.array_equal(rendered[0], rendered[2])
    ref, _ = reference(pos, amp, sig, angles, shifts, shape, ps, blur)
    assert np.abs(rendered[0] - ref[0]).max() <= 1e-5 * ref.max()
    with pytest.raises(ValueError):
        projector.render(cloud, [4])


def test_pixel_coordinates_are_where_the_projector_draws(arch):
    """`TiltGeometry.pixel_coordinates` (the host's convention) puts an atom where the projector's
    rendering of it has its centroid, in every projection (shifts and a tilted axis included)."""
    from engine.kernels.projector import cached_cloud

    g = TiltGeometry.from_tilt_angles([-40.0, 0.0, 35.0], shifts=[[0.4, -0.3], [0.0, 0.0], [-0.2, 0.5]],
                                      axis_angle_deg=7.0)
    shape, pixel = (40, 44), 0.3
    position = np.array([[0.7, -0.9, 1.1]])
    projector = TiltSeriesProjector(g, shape, pixel, 0.0)
    cloud = cached_cloud(1)
    cloud.set(position, np.ones(1), np.full(1, 0.4))
    projector.ensure_capacity(cloud.capacity)
    images = projector.render(cloud, np.arange(3)).astype(np.float64)
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    centroid = np.stack([(images * cols).sum((1, 2)), (images * rows).sum((1, 2))], -1) / images.sum((1, 2))[:, None]
    np.testing.assert_allclose(g.pixel_coordinates(position, shape, pixel)[:, 0], centroid, atol=1e-3)
