"""The data term (engine.kernels.loss) against a NumPy float64 model: losses, dL/dimage, and the
gradients of the per-projection intensity scale and offset (float32 kernels, loose tolerances); the
float64 kernels against central differences of their own loss (tight); and reading the gain off
counted data."""

import numpy as np
import pytest
import taichi as ti

from engine.core.errors import InputError
from engine.kernels.loss import HUBER_DELTA, FitTarget
from engine.measure.datamodel import DataModel, estimate_counts_gain, remove_hot_pixels
from engine.core.geometry import TiltGeometry
from engine.kernels.projector import (FLOAT64_UNSUPPORTED, LANES, TiltSeriesProjector, blocks_per_row, pack_images,
                                      supports_float64, unpack_images)

SHAPE = (12, 19)  # 19 columns: the last 8-pixel block has padding lanes that must not count
DATA = DataModel(background=0.2, scale=3.0, noise=0.05, blur=0.0)
GAIN = 40.0


def numpy_loss(kind, rendered, measured, scale, offset):
    """Per-pixel loss of c_k I + b_k against D, in float64 (the module docstring's formulas)."""
    pred = scale[:, None, None] * rendered + offset[:, None, None]
    if kind == "poisson":
        lam = GAIN * (DATA.scale * pred + DATA.background)
        y = GAIN * (DATA.scale * measured + DATA.background)
        return lam - y * np.log(lam)
    r = (pred - measured) / DATA.noise
    if kind == "huber":
        return np.where(np.abs(r) <= HUBER_DELTA, 0.5 * r * r, HUBER_DELTA * np.abs(r) - 0.5 * HUBER_DELTA**2)
    return 0.5 * r * r


def problem(kind, seed=0, dtype=ti.f32):
    rng = np.random.default_rng(seed)
    n = 3
    rendered = rng.uniform(0.2, 1.0, (n,) + SHAPE)
    measured = rendered * 1.1 + rng.normal(0, DATA.noise, rendered.shape)
    if kind == "huber":  # a few outlier pixels beyond the Huber threshold
        measured.reshape(-1)[rng.choice(measured.size, 20, replace=False)] += 1.0
    scale = rng.uniform(0.9, 1.1, n)
    offset = rng.uniform(-0.05, 0.05, n)
    projector = TiltSeriesProjector(TiltGeometry.from_tilt_angles(np.zeros(n)), SHAPE, 0.3, dtype=dtype)
    target = FitTarget(measured, kind, DATA, GAIN, image=projector.image, image_grad=projector.image_grad,
                       batch=projector.batch)
    projector.image.from_numpy(pack_images(rendered, projector.np_dtype))
    target.set_intensity(scale, offset)
    return projector, target, rendered, measured, scale, offset


@pytest.mark.parametrize("kind", ["l2", "huber", "poisson"])
def test_loss_and_gradients_match_numpy(arch, kind):
    projector, target, rendered, measured, scale, offset = problem(kind)
    n = len(scale)
    target.residual(n, 1.0)
    expected = numpy_loss(kind, rendered, measured, scale, offset)
    assert target.loss_value(n) == pytest.approx(expected.mean(), rel=1e-4)

    def total(r=rendered, c=scale, b=offset):
        return numpy_loss(kind, r, measured, c, b).sum()

    h = 1e-6
    fd_scale = np.array([(total(c=scale + h * e) - total(c=scale - h * e)) / (2 * h) for e in np.eye(n)])
    fd_offset = np.array([(total(b=offset + h * e) - total(b=offset - h * e)) / (2 * h) for e in np.eye(n)])
    np.testing.assert_allclose(target.grad_scale.to_numpy(), fd_scale, rtol=1e-3, atol=1e-3 * np.abs(fd_scale).max())
    np.testing.assert_allclose(target.grad_offset.to_numpy(), fd_offset, rtol=1e-3,
                               atol=1e-3 * np.abs(fd_offset).max())
    # dL/dimage at a few pixels by central differences of the float64 loss
    image_grad = projector.images_numpy(projector.image_grad)
    for k, r, c in [(0, 0, 0), (1, 5, 18), (2, 11, 7)]:
        e = np.zeros_like(rendered)
        e[k, r, c] = h
        fd = (total(r=rendered + e) - total(r=rendered - e)) / (2 * h)
        assert image_grad[k, r, c] == pytest.approx(fd, rel=1e-3, abs=1e-4 * float(np.abs(image_grad).max()))


@pytest.mark.parametrize("kind", ["l2", "poisson"])
def test_a_target_takes_another_data_model_at_run_time(arch, kind):
    """The data model's constants are kernel inputs, not compiled in: a target built for other data
    (`engine.fit.problem` reuses targets) gives the loss of the data model it was last given."""
    projector, target, rendered, measured, scale, offset = problem(kind)
    other = DataModel(background=0.5, scale=1.0, noise=0.2, blur=0.0)
    target.set_data_model(other, 2 * GAIN)
    target.set_measured(measured + 1.0)
    target.residual(len(scale), 1.0)
    before = target.loss_value(len(scale))
    target.set_data_model(DATA, GAIN)
    target.set_measured(measured)
    target.residual(len(scale), 1.0)
    assert target.loss_value(len(scale)) == pytest.approx(numpy_loss(kind, rendered, measured, scale, offset).mean(),
                                                          rel=1e-4)
    assert target.loss_value(len(scale)) != pytest.approx(before, rel=1e-2)


def test_fit_problems_reuse_device_objects_only_once_the_last_owner_is_gone(arch):
    from engine.fit.problem import FitProblem
    from engine.kernels.atommodel import AtomProfile

    geometry = TiltGeometry.from_tilt_angles(np.linspace(-60, 60, 3))
    images = np.zeros((3,) + SHAPE)

    def fit_problem():
        return FitProblem(images, geometry, 0.3, DATA, "l2", None, AtomProfile(), 1.0)

    first = fit_problem()
    second = fit_problem()  # the first still lives: objects of its own
    assert second.projector is not first.projector and second.target is not first.target
    assert second.model is not first.model
    projector, target, model = first.projector, first.target, first.model
    del first
    third = fit_problem()
    assert (third.projector, third.target, third.model) == (projector, target, model)


def test_huber_tempers_outliers_that_l2_squares(arch):
    _, huber, rendered, measured, scale, offset = problem("huber", seed=3)
    _, l2, *_ = problem("l2", seed=3)
    l2.set_measured(measured)
    for target in (huber, l2):
        target.residual(3, 1.0)
    outlier = np.argmax(np.abs(measured - scale[:, None, None] * rendered - offset[:, None, None]))
    grad_huber = unpack_images(huber.image_grad.to_numpy(), SHAPE[1]).reshape(-1)[outlier]
    grad_l2 = unpack_images(l2.image_grad.to_numpy(), SHAPE[1]).reshape(-1)[outlier]
    # Huber caps |dL/dpred| at δ/σ; the squared loss grows with the residual (~1/σ² per unit).
    assert abs(grad_huber) <= HUBER_DELTA / DATA.noise * 1.2 * scale.max()
    assert abs(grad_l2) > 5 * abs(grad_huber)


@pytest.mark.parametrize("kind", ["l2", "huber", "poisson"])
def test_float64_loss_gradients_match_finite_differences(arch, kind):
    # The float64 kernels' own loss, differenced centrally: dL/dimage at pixels across the image (the
    # last column sits in a block with padding lanes), dL/dc_k and dL/db_k; and the loss itself against
    # the NumPy model, now to rounding.
    if not supports_float64(arch):
        pytest.skip(FLOAT64_UNSUPPORTED)
    projector, target, rendered, measured, scale, offset = problem(kind, dtype=ti.f64)
    n = len(scale)
    target.residual(n, 1.0)
    grads = target.intensity_gradients()
    image_grad = unpack_images(projector.image_grad.to_numpy(), SHAPE[1])
    expected = numpy_loss(kind, rendered, measured, scale, offset)
    assert target.loss_value(n) == pytest.approx(expected.mean(), rel=1e-12)

    def total(r=rendered, c=scale, b=offset, k=None):
        """The kernels' loss summed over all projections, or over projection k alone (a batch of one:
        a smaller sum, less rounding for the differences of one pixel)."""
        projector.image.from_numpy(pack_images(r, np.float64))
        target.set_intensity(c, b)
        projector.set_batch(np.arange(n) if k is None else [k])
        return target.loss_value(projector.batch_size) * projector.batch_size * SHAPE[0] * SHAPE[1]

    # Steps: small enough that no Huber residual crosses the kink (the loss is only C¹ there), large
    # enough that the rounding of the sums stays far below the tolerance.
    h = {"l2": 1e-5, "huber": 1e-6, "poisson": 1e-5}[kind]
    rtol = 1e-6
    eye = np.eye(n)
    fd_scale = np.array([(total(c=scale + h * e) - total(c=scale - h * e)) / (2 * h) for e in eye])
    fd_offset = np.array([(total(b=offset + h * e) - total(b=offset - h * e)) / (2 * h) for e in eye])
    assert np.abs(grads["scale"] - fd_scale).max() <= rtol * np.abs(fd_scale).max()
    assert np.abs(grads["offset"] - fd_offset).max() <= rtol * np.abs(fd_offset).max()
    rng = np.random.default_rng(5)
    picks = [(0, 0, 0), (1, 5, 18), (2, 11, 7), (0, 11, 18)] + [tuple(rng.integers((n,) + SHAPE)) for _ in range(12)]
    fd, got = [], []
    for k, r, c in picks:
        e = np.zeros_like(rendered)
        e[k, r, c] = h
        fd.append((total(r=rendered + e, k=k) - total(r=rendered - e, k=k)) / (2 * h))
        got.append(image_grad[k, r, c])
    fd, got = np.array(fd), np.array(got)
    assert np.abs(got - fd).max() <= rtol * np.abs(fd).max()


def test_residual_reads_and_writes_only_the_fields_and_batch_it_is_given(arch):
    # No projector: plain fields in the documented packed layout, a batch of two projections of
    # three, a mini-batch scale. Projection 1 is outside the batch and keeps what it held.
    n = 3
    packed = (n, SHAPE[0], blocks_per_row(SHAPE[1]))
    image, image_grad = ti.Vector.field(LANES, ti.f32, packed), ti.Vector.field(LANES, ti.f32, packed)
    batch = ti.field(ti.i32, 2)
    batch.from_numpy(np.array([2, 0], np.int32))
    rng = np.random.default_rng(6)
    rendered = rng.uniform(0.2, 1.0, (n,) + SHAPE)
    measured = rendered + rng.normal(0, DATA.noise, rendered.shape)
    image.from_numpy(pack_images(rendered))
    sentinel = np.full((n,) + SHAPE, 7.0)
    image_grad.from_numpy(pack_images(sentinel))
    target = FitTarget(measured, "l2", DATA, GAIN, image=image, image_grad=image_grad, batch=batch)
    scale, offset = np.array([1.1, 0.9, 1.05]), np.array([0.01, -0.02, 0.0])
    target.set_intensity(scale, offset)
    target.residual(2, 1.5)
    got = unpack_images(image_grad.to_numpy(), SHAPE[1])
    pred = scale[:, None, None] * rendered + offset[:, None, None]
    want = 1.5 * scale[:, None, None] * (pred - measured) / DATA.noise**2
    assert np.array_equal(got[1], sentinel[1])
    np.testing.assert_allclose(got[[0, 2]], want[[0, 2]], rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert target.loss_value(2) == pytest.approx(numpy_loss("l2", rendered, measured, scale, offset)[[2, 0]].mean(),
                                                 rel=1e-4)
    with pytest.raises(ValueError, match="shape"):
        FitTarget(measured[:, :, :8], "l2", DATA, GAIN, image=image, image_grad=image_grad, batch=batch)


@pytest.mark.parametrize("counts", [25.0, 1e3, 1e5])
def test_gain_is_read_off_whole_count_data(counts):
    rng = np.random.default_rng(0)
    clean = rng.uniform(0, 3.7, (4, 30, 30))
    quantum = clean.max() / counts
    data = (rng.poisson(clean / quantum) * quantum).astype(np.float32)
    assert estimate_counts_gain(data) == pytest.approx(1 / quantum, rel=1e-6)


def test_gain_refuses_data_that_are_not_counts():
    data = np.random.default_rng(1).uniform(0, 1, (2, 20, 20)).astype(np.float32)
    with pytest.raises(InputError, match="pass --gain"):
        estimate_counts_gain(data, "noisy.mrc")


def test_hot_pixels_are_removed_and_atoms_kept():
    # A sharp atom (σ = 1 px, the narrowest the fit meets) and two hot pixels on noise.
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:32, 0:32]
    atom = 100.0 * np.exp(-((xx - 10.3) ** 2 + (yy - 12.6) ** 2) / 2.0)
    image = 5.0 + atom + rng.normal(0, 1.0, atom.shape)
    image[25, 25] += 300.0
    image[12, 11] += 300.0  # on the atom's shoulder
    cleaned = remove_hot_pixels(image[None], background=5.0, noise_sigma=1.0)[0]
    changed = np.argwhere(cleaned != image)
    assert {tuple(p) for p in changed} == {(25, 25), (12, 11)}
    for r, c in changed:  # replaced by a value among its neighbours'
        ring = np.delete(image[r - 1:r + 2, c - 1:c + 2].ravel(), 4)
        assert ring.min() <= cleaned[r, c] <= ring.max()


@pytest.mark.parametrize("kind,components", [("l2", 1), ("poisson", 1), ("l2", 2)])
def test_fused_step_is_the_separate_kernels_step(arch, kind, components, monkeypatch):
    """The one-kernel step (engine.kernels.step, CPU only) moves atoms, Adam moments and offsets
    exactly as the kernels launched one by one: bit for bit (the same loops in the same order)."""
    if arch != "cpu":
        pytest.skip("the fused step runs on the CPU only")
    from engine.fit.problem import FitProblem, with_moments
    from engine.kernels.atommodel import AtomProfile
    from engine.kernels.projector import project_tilt_series

    angles = np.linspace(-60, 60, 5)
    geometry = TiltGeometry.from_tilt_angles(angles)
    rng = np.random.default_rng(3)
    truth = rng.uniform(-1.5, 1.5, (6, 3))
    images = project_tilt_series(truth, np.full(6, 0.4), np.full(6, 0.4), geometry, SHAPE, 0.3).astype(np.float64)
    images += rng.normal(0, DATA.noise, images.shape)
    start = with_moments({"pos": truth + rng.normal(0, 0.1, truth.shape), "amp": np.full(6, 0.3),
                          "sigma": np.full(6, 0.5)})
    lr = {"lr_position": 0.01, "lr_amplitude": 0.02, "lr_width": 0.02}
    results = []
    for fused in (True, False):
        profile = AtomProfile() if components == 1 else AtomProfile((0.7, 0.3), (0.0, 0.2))  # a core and a tail
        fit = FitProblem(images, geometry, 0.3, DATA, kind, GAIN, profile, 1.0)
        fit.upload(start)
        assert fit._fusable(False)
        if not fused:
            monkeypatch.setattr(fit, "_fusable", lambda align: False)
        for i in range(12):
            fit.step(lr, np.arange(5) if i % 2 else np.array([0, 2, 4]), False, kind != "poisson", False)
        results.append((fit.state(), fit.target.offsets()))
        del fit
    (fused, fused_offsets), (separate, separate_offsets) = results
    for key in ("pos", "amp", "sigma", "m", "v"):
        np.testing.assert_array_equal(fused[key], separate[key])
    np.testing.assert_array_equal(fused_offsets, separate_offsets)
    assert np.abs(fused["pos"] - start["pos"]).max() > 0.01  # the atoms did move
