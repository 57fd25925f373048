"""The data term (engine.fit) against a NumPy float64 model: losses, dL/dimage, and the gradients of
the per-projection intensity scale and offset; and reading the gain off counted data."""

import numpy as np
import pytest

from engine.core.errors import InputError
from engine.kernels.loss import HUBER_DELTA, FitTarget
from engine.measure.datamodel import DataModel, estimate_counts_gain, remove_hot_pixels
from engine.core.geometry import TiltGeometry
from engine.kernels.projector import TiltSeriesProjector, pack_images

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


def problem(kind, seed=0):
    rng = np.random.default_rng(seed)
    n = 3
    rendered = rng.uniform(0.2, 1.0, (n,) + SHAPE)
    measured = rendered * 1.1 + rng.normal(0, DATA.noise, rendered.shape)
    if kind == "huber":  # a few outlier pixels beyond the Huber threshold
        measured.reshape(-1)[rng.choice(measured.size, 20, replace=False)] += 1.0
    scale = rng.uniform(0.9, 1.1, n)
    offset = rng.uniform(-0.05, 0.05, n)
    projector = TiltSeriesProjector(TiltGeometry.from_tilt_angles(np.zeros(n)), SHAPE, 0.3)
    target = FitTarget(projector, measured, kind, DATA, GAIN)
    projector.image.from_numpy(pack_images(rendered))
    target.set_intensity(scale, offset)
    return projector, target, rendered, measured, scale, offset


@pytest.mark.parametrize("kind", ["l2", "huber", "poisson"])
def test_loss_and_gradients_match_numpy(arch, kind):
    projector, target, rendered, measured, scale, offset = problem(kind)
    n = len(scale)
    target.residual(n, 1.0)
    expected = numpy_loss(kind, rendered, measured, scale, offset)
    assert target.loss_value() == pytest.approx(expected.mean(), rel=1e-4)

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


def test_huber_tempers_outliers_that_l2_squares(arch):
    _, huber, rendered, measured, scale, offset = problem("huber", seed=3)
    _, l2, *_ = problem("l2", seed=3)
    l2.set_measured(measured)
    for target in (huber, l2):
        target.residual(3, 1.0)
    outlier = np.argmax(np.abs(measured - scale[:, None, None] * rendered - offset[:, None, None]))
    grad_huber = huber.projector.images_numpy(huber.projector.image_grad).reshape(-1)[outlier]
    grad_l2 = l2.projector.images_numpy(l2.projector.image_grad).reshape(-1)[outlier]
    # Huber caps |dL/dpred| at δ/σ; the squared loss grows with the residual (~1/σ² per unit).
    assert abs(grad_huber) <= HUBER_DELTA / DATA.noise * 1.2 * scale.max()
    assert abs(grad_l2) > 5 * abs(grad_huber)


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
