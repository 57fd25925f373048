"""The voxel projector pair, FBP and SIRT, atom tracing, and an independent check against ASTRA."""

import numpy as np
import pytest

from engine.classical.baseline import classify_species, otsu_threshold, refine_subvoxel, trace_atoms
from engine.core.geometry import TiltGeometry
from engine.kernels.volume import VoxelProjector, suppress_close

GRID = (20, 16, 20)
ORIGIN = (-4.75, -3.75, -4.75)


def make_projector(angles=np.arange(-60.0, 61.0, 10.0), shape=(30, 34), pixel=0.4):
    projector = VoxelProjector(len(angles), shape, pixel, GRID, ORIGIN, 0.5)
    projector.set_geometry(TiltGeometry.from_tilt_angles(angles))
    return projector


def ball(radius=3.0, centre=(0.0, 0.0, 0.0)):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in GRID], indexing="ij"), -1) * 0.5 + np.array(ORIGIN)
    return (np.linalg.norm(grid - np.array(centre), axis=-1) < radius).astype(np.float64)


def test_projector_pair_is_adjoint(arch):
    projector = make_projector()
    rng = np.random.default_rng(0)
    v = rng.random(GRID)
    y = rng.normal(size=(projector.n_proj, 30, 34))
    lhs = np.sum(projector.project(v) * y)
    rhs = np.sum(v * projector.backproject(y))
    assert abs(lhs - rhs) <= 1e-5 * np.sqrt(np.sum(projector.project(v) ** 2) * np.sum(y**2)) * 10


def test_hull_counts_the_views_and_keeps_what_every_view_covers(arch):
    """Inside the hull, a voxel's views are the back-projection of ones; a voxel leaves the hull
    (−1) when one view that sees it does not cover it (independent reference: each voxel's centre
    projected by NumPy)."""
    angles = np.arange(-60.0, 61.0, 10.0)
    projector = make_projector(angles, shape=(30, 24))  # narrower than the grid: edge voxels leave views
    ones = np.ones((len(angles), 30, 24))
    masks = ones.copy()
    masks[3, :, 12:] = 0.0  # the +30° view covers only its left half
    views = projector.hull(masks)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in GRID], indexing="ij"), -1) * 0.5 + np.array(ORIGIN)
    t = np.deg2rad(angles)
    x = (grid[..., 0, None] * np.cos(t) + grid[..., 2, None] * np.sin(t)) / 0.4 + 11.5  # pixels, per view
    seen = (x >= 0) & (x <= 23)
    clear_of_the_edge = np.abs(x[..., 3] - 11.5) > 1.0  # bilinear weights blend the two halves near x' = 0
    lost = seen[..., 3] & (x[..., 3] >= 12) & clear_of_the_edge
    kept = ~(seen[..., 3] & (x[..., 3] >= 11))
    assert np.all(views[lost] == -1) and lost.any()
    assert np.array_equal(views[kept], seen.sum(axis=-1)[kept]) and (seen.sum(axis=-1)[kept] < len(angles)).any()
    everywhere = projector.hull(ones)
    assert np.array_equal(everywhere, np.rint(projector.backproject(ones) / projector.splat_scale).astype(int))


def test_backprojection_in_a_region_is_the_whole_ones_there(arch):
    projector = make_projector()
    y = np.random.default_rng(2).normal(size=(projector.n_proj, 30, 34))
    whole = projector.backproject(y)
    region = ball(radius=3.5) > 0
    part = projector.backproject(y, region)
    assert np.array_equal(part[region], whole[region]) and np.all(part[~region] == 0)
    assert np.array_equal(projector.backproject(y), whole)  # the next call without a region: everywhere


def test_float64_projector_pair_is_adjoint_to_rounding(arch):
    # No exp or log here, so Vulkan runs float64 too where the device has 64-bit floats (lavapipe does).
    angles = np.arange(-60.0, 61.0, 10.0)
    projector = VoxelProjector(len(angles), (30, 34), 0.4, GRID, ORIGIN, 0.5, dtype=np.float64)
    projector.set_geometry(TiltGeometry.from_tilt_angles(angles, np.random.default_rng(1).uniform(-1, 1, (13, 2))))
    rng = np.random.default_rng(0)
    v = rng.random(GRID)
    y = rng.normal(size=(projector.n_proj, 30, 34))
    try:
        av = projector.project(v)
    except RuntimeError as error:  # a Vulkan device without shaderFloat64 fails to compile
        if arch == "cpu":
            raise
        pytest.skip(f"no float64 on this {arch} device: {error}")
    assert av.dtype == np.float64
    lhs, rhs = np.sum(av * y), np.sum(v * projector.backproject(y))
    assert abs(lhs - rhs) <= 1e-13 * np.sqrt(np.sum(av**2) * np.sum(y**2))


def test_projection_conserves_mass_and_lands_at_the_contract_position(arch):
    projector = make_projector(angles=np.array([0.0, 30.0]))
    v = np.zeros(GRID)
    v[14, 8, 10] = 2.0  # world (2.25, 0.25, 0.25) Å
    images = projector.project(v)
    assert images.sum(axis=(1, 2)) == pytest.approx([2.0 * 0.5**3 / 0.4**2] * 2, rel=1e-5)
    x = np.array([2.25 * np.cos(np.deg2rad(t)) + 0.25 * np.sin(np.deg2rad(t)) for t in (0.0, 30.0)])
    cols = (np.arange(34) - 16.5) * 0.4
    assert np.allclose((images.sum(axis=1) * cols).sum(axis=1) / images.sum(axis=(1, 2)), x, atol=1e-4)


def test_sirt_converges_on_a_phantom(arch):
    projector = make_projector()
    phantom = ball()
    data = projector.project(phantom)
    residuals = []
    volume = projector.sirt(data, 40, callback=lambda it, v, r: residuals.append(r))
    assert np.all(np.diff(residuals) <= 1e-6 * residuals[0])  # monotone
    assert residuals[-1] < 0.05 * residuals[0]
    assert volume.min() >= 0.0
    assert np.corrcoef(volume.ravel(), phantom.ravel())[0, 1] > 0.97
    fbp = projector.fbp(data)
    assert np.corrcoef(fbp.ravel(), phantom.ravel())[0, 1] > 0.8


def test_ramp_filter_in_blocks_is_the_whole_series_filtered_at_once(monkeypatch):
    """The FBP's ramp filter, a few rows at a time in single precision, against the same filter of
    every row at once in float64 NumPy: the Hann-windowed |f| on the zero-padded row's spectrum."""
    import engine.kernels.volume as volume

    images = np.random.default_rng(2).normal(size=(3, 7, 30)) + 5.0
    monkeypatch.setattr(volume, "FILTER_ROWS", 4)  # 21 rows: six blocks, the last short
    pad = 64  # the power of two ≥ 2 × 30
    freq = np.fft.rfftfreq(pad, d=0.4)
    reference = np.fft.irfft(np.fft.rfft(images, n=pad) * freq * 0.5 * (1 + np.cos(np.pi * freq / freq[-1])),
                             n=pad)[..., :30]
    filtered = volume.ramp_filter(images, 0.4)
    assert filtered.shape == images.shape and filtered.dtype == np.float32
    np.testing.assert_allclose(filtered, reference, atol=1e-5 * np.abs(reference).max())
    np.testing.assert_allclose(volume.ramp_filter(images, 0.4, np.float64), reference, rtol=1e-12,
                               atol=1e-12 * np.abs(reference).max())


def test_peaks_suppression_and_subvoxel_refinement():
    volume = np.zeros((12, 12, 12))
    z, y, x = np.mgrid[0:12, 0:12, 0:12]
    true = np.array([4.3, 6.0, 5.8])
    volume += np.exp(-((z - true[0]) ** 2 + (y - true[1]) ** 2 + (x - true[2]) ** 2) / 2.0)
    index = np.array([[4, 6, 6]])
    assert np.allclose(index + refine_subvoxel(volume, index), true, atol=0.1)
    positions = np.array([[0.0, 0, 0], [1.0, 0, 0], [3.0, 0, 0]])
    kept, values = suppress_close(positions, np.array([3.0, 2.0, 1.0]), 1.5)
    assert np.array_equal(kept, positions[[0, 2]]) and np.array_equal(values, [3.0, 1.0])


def test_otsu_and_species_classification():
    rng = np.random.default_rng(1)
    low, high = rng.normal(1.0, 0.1, 300), rng.normal(5.0, 0.3, 100)
    threshold = otsu_threshold(np.concatenate([low, high]))
    assert low.max() < threshold < high.min()
    intensity = np.concatenate([rng.normal(10.0, 0.5, 60), rng.normal(17.0, 0.5, 40)])
    labels = classify_species(intensity, ["Pt", "Ni"])
    assert np.all(labels[:60] == "Ni") and np.all(labels[60:] == "Pt")


def test_tracing_finds_blobs_in_a_reconstruction(arch):
    projector = make_projector(angles=np.arange(-70.0, 71.0, 5.0))
    centres = np.array([[-2.0, -1.0, 1.5], [1.5, 1.0, -1.0], [0.5, -1.5, 2.5]])
    phantom = sum(ball(0.6, c) for c in centres)
    volume = projector.sirt(projector.project(phantom), 30)
    atoms = trace_atoms(volume, projector, 1.5, ["Au"])
    assert len(atoms) == 3 and set(atoms.species) == {"Au"}
    distance = np.linalg.norm(atoms.positions[:, None] - centres[None], axis=-1).min(axis=1)
    assert distance.max() < 0.3


def test_sirt_agrees_with_astra(arch):
    """ASTRA's CPU SIRT, slice by slice (the tilt axis is y, so each y-slice is a 2D parallel-beam
    problem), on the same data and iteration count: correlation ≥ 0.99 with our volume."""
    astra = pytest.importorskip("astra")
    if arch != "cpu":
        pytest.skip("compared once, on the CPU")
    angles = np.arange(-60.0, 61.0, 4.0)
    projector = VoxelProjector(len(angles), (16, 41), 0.5, (41, 16, 41), (-10.0, -3.75, -10.0), 0.5)
    projector.set_geometry(TiltGeometry.from_tilt_angles(angles))
    grid = np.stack(np.meshgrid(np.arange(41), np.arange(16), np.arange(41), indexing="ij"), -1) * 0.5
    grid += np.array([-10.0, -3.75, -10.0])
    phantom = sum(np.exp(-np.sum((grid - c) ** 2, -1) / 0.5) for c in [[-3, 0, 2], [2, 1, -4], [4, -1, 3], [0, 0, 0]])
    data = projector.project(phantom)
    ours = projector.sirt(data, 30)
    # ASTRA 2D: volume rows ↔ z, columns ↔ x; its detector coordinate is x cos φ − z sin φ with our
    # rows-down z, so φ = −θ; detector pixels of 0.5 Å in volume-pixel units are 1.
    vol_geom = astra.create_vol_geom(41, 41)
    proj_geom = astra.create_proj_geom("parallel", 1.0, 41, -np.deg2rad(angles))
    proj_id = astra.create_projector("linear", proj_geom, vol_geom)
    theirs = np.zeros_like(ours)
    for j in range(16):
        sino = astra.data2d.create("-sino", proj_geom, data[:, j, :])
        rec = astra.data2d.create("-vol", vol_geom, 0.0)
        cfg = astra.astra_dict("SIRT")
        cfg.update(ProjectorId=proj_id, ReconstructionDataId=rec, ProjectionDataId=sino,
                   option={"MinConstraint": 0.0})
        alg = astra.algorithm.create(cfg)
        astra.algorithm.run(alg, 30)
        theirs[:, j, :] = astra.data2d.get(rec).T
        astra.algorithm.delete(alg)
        astra.data2d.delete([sino, rec])
    astra.projector.delete(proj_id)
    correlation = np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
    print(f"SIRT correlation with ASTRA: {correlation:.4f}")
    assert correlation >= 0.99
