"""Tilt-series I/O: round trips through every format, validation, and bad input reported by file name."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from PIL import Image

from engine.core.errors import InputError
from engine.core.geometry import TiltGeometry, euler_zyz, rotation_about_y
from engine.io.tiltseries import TiltSeries, read_tilt_series, summarize, write_tilt_series

from conftest import SHARED_DATA as DATA


def make_series(n=5, height=6, width=8, **kwargs) -> TiltSeries:
    """Non-square images with distinct values, so a transposed or reordered read is caught."""
    rng = np.random.default_rng(0)
    fields = dict(projections=rng.normal(size=(n, height, width)).astype(np.float32),
                  angles=np.linspace(-60.0, 60.0, n), pixel_size=0.3)
    fields.update(kwargs)
    return TiltSeries(**fields)


def save_npz(path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def save_mrc(path, data, voxel_size=0.0) -> Path:
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.asarray(data, dtype=np.float32))
        mrc.voxel_size = voxel_size
    return path


def write_angles(path, angles) -> Path:
    path.write_text("".join(f"{a}\n" for a in angles))
    return path


def assert_same_images(read: TiltSeries, written: TiltSeries):
    assert read.projections.dtype == np.float32 and read.angles.dtype == np.float64
    np.testing.assert_array_equal(read.projections, written.projections)
    np.testing.assert_array_equal(read.angles, written.angles)
    assert read.pixel_size == written.pixel_size


@contextmanager
def raises_input_error(path, *words):
    """Assert the block raises an InputError whose message names the file and contains every word."""
    with pytest.raises(InputError) as info:
        yield info
    message = str(info.value)
    assert Path(path).name in message, message
    for word in words:
        assert word in message, message


# ------------------------------------------------------------------------------------------ round trips

def test_npz_round_trip_without_geometry(tmp_path):
    series = make_series(noise_sigma=0.5, blur_sigma=0.4, description="hand-made test series")
    out = write_tilt_series(series, tmp_path / "s.npz")
    assert out == tmp_path / "s.npz"
    with np.load(out) as raw:  # the contract's key names, and no geometry keys when none was set
        assert set(raw.files) == {"projections", "angles", "pixel_size", "noise_sigma", "blur_sigma_A", "description"}
    read = read_tilt_series(out)
    assert_same_images(read, series)
    assert (read.noise_sigma, read.blur_sigma, read.description) == (0.5, 0.4, "hand-made test series")
    assert read.geometry is None and read.source == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]  # no temporary file left behind


def test_npz_round_trip_with_geometry(tmp_path):
    rotations = np.stack([euler_zyz(10 * k, 20 + k, -5 * k) for k in range(5)])
    shifts = np.arange(10.0).reshape(5, 2) / 7
    axes = np.tile([np.sqrt(0.5), np.sqrt(0.5)], (5, 1))
    series = make_series(geometry=TiltGeometry(rotations, shifts, axes))
    read = read_tilt_series(write_tilt_series(series, tmp_path / "g.npz"))
    assert_same_images(read, series)
    for key in ("rotations", "shifts", "tilt_axes"):
        np.testing.assert_array_equal(getattr(read.geometry, key), getattr(series.geometry, key))
    np.testing.assert_array_equal(read.get_geometry().rotations, rotations)


@pytest.mark.parametrize("suffix", [".mrc", ".st", ".mrcs"])
def test_mrc_round_trip_with_tlt(tmp_path, suffix):
    series = make_series(pixel_size=0.35)
    out = write_tilt_series(series, tmp_path / f"stack{suffix}")
    tlt = tmp_path / "stack.tlt"
    assert tlt.is_file()
    np.testing.assert_array_equal(np.loadtxt(tlt), series.angles)
    with mrcfile.open(out) as mrc:
        assert mrc.is_image_stack() and mrc.voxel_size.x == pytest.approx(0.35)
    read = read_tilt_series(out)
    assert_same_images(read, series)  # pixel size exactly 0.35 despite the float32 header
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, tlt.name])


def test_mrc_header_pixel_size_and_rawtlt(tmp_path):
    data = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    path = save_mrc(tmp_path / "raw.mrc", data, voxel_size=0.45)
    write_angles(tmp_path / "raw.rawtlt", [-30, 0, 30])
    read = read_tilt_series(path)
    assert read.pixel_size == 0.45
    np.testing.assert_array_equal(read.angles, [-30.0, 0.0, 30.0])
    np.testing.assert_array_equal(read.projections, data)  # (section, row, col) as stored, no flips
    with pytest.warns(UserWarning, match="0.45"):  # an explicit pixel size wins over the header
        assert read_tilt_series(path, pixel_size=0.5).pixel_size == 0.5


def test_mrc_without_header_pixel_size_uses_argument(tmp_path):
    path = save_mrc(tmp_path / "nopix.mrc", np.ones((2, 4, 4)))
    write_angles(tmp_path / "nopix.tlt", [0, 10])
    assert read_tilt_series(path, pixel_size=0.25).pixel_size == 0.25
    with raises_input_error(path, "--pixel"):
        read_tilt_series(path)


def save_tiff(path, stack) -> Path:
    """Multi-page float32 TIFF written by Pillow, independently of the reader under test."""
    pages = [Image.fromarray(page) for page in np.asarray(stack, dtype=np.float32)]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    return path


@pytest.mark.filterwarnings("ignore:ImageIO's vendored tifffile backend:DeprecationWarning")
def test_tiff_round_trip_with_tlt(tmp_path):
    series = make_series(n=4)
    path = save_tiff(tmp_path / "stack.tif", series.projections)
    write_angles(tmp_path / "stack.tlt", series.angles)
    assert_same_images(read_tilt_series(path, pixel_size=0.3), series)
    with raises_input_error(path, "--pixel"):
        read_tilt_series(path)


def test_angles_file_argument_overrides(tmp_path):
    series = make_series(n=3)
    out = write_tilt_series(series, tmp_path / "s.npz")
    angles = write_angles(tmp_path / "other.txt", ["  -1.5", "", "0.25", "2"])
    np.testing.assert_array_equal(read_tilt_series(out, angles_file=angles).angles, [-1.5, 0.25, 2.0])


def save_mat_v73(path, **arrays) -> Path:
    """A MATLAB v7.3 file as MATLAB writes it: HDF5 behind a 512-byte header, each array column-major
    (so HDF5 sees its axes reversed) and tagged with its MATLAB class."""
    import h5py

    with h5py.File(path, "w", userblock_size=512) as f:
        for name, value in arrays.items():
            value = np.asarray(value)
            f[name] = value.T
            f[name].attrs["MATLAB_class"] = np.bytes_("single" if value.dtype == np.float32 else "double")
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, written by the atomsplat tests".ljust(116, b" "))
    return path


def save_mat(path, version, **arrays) -> Path:
    if version == "v7.3":
        return save_mat_v73(path, **arrays)
    from scipy.io import savemat

    savemat(path, arrays)  # v5, what MATLAB writes with -v7 short of compression
    return path


@pytest.mark.parametrize("version", ["v5", "v7.3"])
def test_mat_round_trip_finds_array_angles_and_pixel(tmp_path, version):
    written = make_series()
    stack = np.transpose(written.projections, (2, 1, 0))  # MATLAB's x by y by projection
    path = save_mat(tmp_path / "series.mat", version, tomo=stack, tilt_angles=written.angles[None, :],
                    pixel_size=np.float64(0.3), notes=np.zeros((2, 2)))
    read = read_tilt_series(path)
    assert_same_images(read, written)
    assert read.source == str(path)
    # the same array stored projection-first, named explicitly, angles from a .tlt instead
    path = save_mat(tmp_path / "kyx.mat", version, a=written.projections, b=written.projections[:, ::-1])
    tlt = write_angles(tmp_path / "angles.tlt", written.angles)
    read = read_tilt_series(path, pixel_size=0.3, angles_file=tlt, mat_key="a", layout="kyx")
    assert_same_images(read, written)


@pytest.mark.parametrize("version", ["v5", "v7.3"])
def test_mat_ambiguities_name_the_option(tmp_path, version):
    written = make_series()
    stack = np.transpose(written.projections, (2, 1, 0))
    two = save_mat(tmp_path / "two.mat", version, raw=stack, aligned=stack, angles=written.angles)
    with raises_input_error(two, "2 3D numeric arrays", "--mat-key", "raw (8x6x5)", "aligned"):
        read_tilt_series(two, pixel_size=0.3)
    read = read_tilt_series(two, pixel_size=0.3, mat_key="aligned")
    np.testing.assert_array_equal(read.angles, written.angles)
    with raises_input_error("--mat-key", "no variable 'tomo'", "raw"):
        read_tilt_series(two, pixel_size=0.3, mat_key="tomo")
    vectors = save_mat(tmp_path / "vectors.mat", version, stack=stack, angles=written.angles, dose=np.ones(5))
    with raises_input_error(vectors, "2 vectors of 5 values", "--angles KEY", "dose"):
        read_tilt_series(vectors, pixel_size=0.3)
    np.testing.assert_array_equal(read_tilt_series(vectors, pixel_size=0.3, angles_file="angles").angles,
                                  written.angles)
    bare = save_mat(tmp_path / "bare.mat", version, stack=stack)
    with raises_input_error(bare, "no tilt angles", "--angles KEY"):
        read_tilt_series(bare, pixel_size=0.3)
    with raises_input_error(bare, "no pixel size", "--pixel"):
        read_tilt_series(bare, angles_file=write_angles(tmp_path / "a.tlt", written.angles))
    with raises_input_error("--layout", "xxk", "each of k"):
        read_tilt_series(vectors, pixel_size=0.3, layout="xxk")


def test_read_dev_dataset():
    path = DATA / "dev_au_cubo_small.npz"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the contract file must read without any warning
        series = read_tilt_series(path)
    assert series.projections.shape == (60, 96, 96) and series.shape == (96, 96)
    assert series.pixel_size == pytest.approx(0.3)
    assert series.angles[0] == -90.0 and series.angles[-1] == 87.0
    assert series.noise_sigma == pytest.approx(24.61, abs=0.01) and series.blur_sigma == pytest.approx(0.4)
    assert series.description.startswith("dev_au_cubo_small")
    info = summarize(series)
    assert info["angle_step"] == pytest.approx(3.0) and info["missing_wedge_deg"] == pytest.approx(3.0)
    assert info["field_of_view_A"] == pytest.approx((28.8, 28.8)) and info["nan_count"] == 0


# ------------------------------------------------------------------------------------------ validation

def test_2d_projections_npz(tmp_path):
    path = save_npz(tmp_path / "flat.npz", projections=np.zeros((96, 96), np.float32), angles=[0.0], pixel_size=0.3)
    with raises_input_error(path, "2D", "(96, 96)", "expected a 3D stack"):
        read_tilt_series(path)


def test_2d_mrc(tmp_path):
    path = save_mrc(tmp_path / "single.mrc", np.zeros((8, 9)), voxel_size=0.3)
    write_angles(tmp_path / "single.tlt", [0.0])
    with raises_input_error(path, "2D", "expected a 3D stack"):
        read_tilt_series(path)


def test_empty_stack(tmp_path):
    path = save_npz(tmp_path / "empty.npz", projections=np.zeros((0, 8, 8), np.float32),
                    angles=np.zeros(0), pixel_size=0.3)
    with raises_input_error(path, "empty"):
        read_tilt_series(path)


@pytest.mark.parametrize("bad, words", [(np.nan, ("1 NaN", "0 inf")), (np.inf, ("0 NaN", "1 inf"))])
def test_non_finite_pixels(tmp_path, bad, words):
    projections = np.ones((4, 5, 5), np.float32)
    projections[2, 1, 3] = bad
    path = save_npz(tmp_path / "holes.npz", projections=projections, angles=np.arange(4.0), pixel_size=0.3)
    with raises_input_error(path, *words, "projection index 2"):
        read_tilt_series(path)


def test_angle_count_mismatch(tmp_path):
    path = save_npz(tmp_path / "count.npz", projections=np.ones((4, 5, 5), np.float32),
                    angles=np.arange(5.0), pixel_size=0.3)
    with raises_input_error(path, "5 tilt angles for 4 projections"):
        read_tilt_series(path)


def test_non_finite_angles(tmp_path):
    path = save_npz(tmp_path / "ang.npz", projections=np.ones((3, 5, 5), np.float32),
                    angles=[0.0, np.nan, 2.0], pixel_size=0.3)
    with raises_input_error(path, "non-finite tilt angles", "index 1"):
        read_tilt_series(path)


@pytest.mark.parametrize("pixel, word", [(0.0, "positive"), (-0.3, "positive"), (np.nan, "positive"),
                                         (None, "--pixel")])
def test_bad_pixel_size(tmp_path, pixel, word):
    arrays = dict(projections=np.ones((2, 5, 5), np.float32), angles=[0.0, 1.0])
    if pixel is not None:
        arrays["pixel_size"] = pixel
    path = save_npz(tmp_path / "pix.npz", **arrays)
    with raises_input_error(path, "pixel size", word):
        read_tilt_series(path)


def test_in_memory_series_is_named_in_errors():
    with pytest.raises(InputError, match="^tilt series: .*3 tilt angles for 5 projections"):
        make_series(angles=[0.0, 1.0, 2.0]).validate()


def test_soft_warnings():
    series = make_series(n=5, angles=[-20.0, 0.0, 20.0, 0.0, 40.0])
    with pytest.warns(UserWarning) as record:
        issues = series.validate()
    assert len(issues) == 2 and len(record) == 2
    assert "not monotonic" in issues[0] and "index 3" in issues[0]
    assert "duplicate" in issues[1] and "0° ×2" in issues[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_series(angles=np.linspace(60.0, -60.0, 5)).validate() == []  # descending is fine


# ------------------------------------------------------------------------------------------ unreadable files

def test_missing_file(tmp_path):
    with raises_input_error(tmp_path / "nothere.npz", "not found"):
        read_tilt_series(tmp_path / "nothere.npz")


def test_unknown_extension(tmp_path):
    path = tmp_path / "stack.h5"
    path.write_bytes(b"x")
    with raises_input_error(path, "unknown tilt-series format", ".h5"):
        read_tilt_series(path)
    with raises_input_error(path, "cannot write format"):
        write_tilt_series(make_series(), path, overwrite=True)


def test_truncated_npz(tmp_path):
    whole = write_tilt_series(make_series(), tmp_path / "whole.npz").read_bytes()
    path = tmp_path / "cut.npz"
    path.write_bytes(whole[: len(whole) // 2])
    with raises_input_error(path, "cannot read", "truncated"):
        read_tilt_series(path)


def test_text_named_npz(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("these are my notes\n" * 10)
    with raises_input_error(path, "not an .npz archive") as info:
        read_tilt_series(path)
    assert "pickle" not in str(info.value)  # numpy's guess for a file that is no zip at all


def test_npz_without_projections(tmp_path):
    path = save_npz(tmp_path / "nokey.npz", images=np.ones((2, 3, 3)), angles=[0.0, 1.0], pixel_size=0.3)
    with raises_input_error(path, "'projections'", "images"):
        read_tilt_series(path)


@pytest.mark.parametrize("keep", [600, 1100])  # header cut short; data block cut short
def test_truncated_mrc(tmp_path, keep):
    whole = save_mrc(tmp_path / "whole.mrc", np.ones((3, 8, 8)), voxel_size=0.3).read_bytes()
    path = tmp_path / "cut.mrc"
    path.write_bytes(whole[:keep])
    write_angles(tmp_path / "cut.tlt", [0, 1, 2])
    with raises_input_error(path, "cannot read as an MRC file"):
        read_tilt_series(path)


def test_truncated_tiff(tmp_path):
    whole = save_tiff(tmp_path / "whole.tif", np.ones((3, 8, 8))).read_bytes()
    path = tmp_path / "cut.tif"
    path.write_bytes(whole[:200])
    write_angles(tmp_path / "cut.tlt", [0, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TIFF decoder warns about the broken tags on its way down
        with raises_input_error(path, "cannot read as a TIFF image"):
            read_tilt_series(path, pixel_size=0.3)


def test_missing_angles_for_mrc(tmp_path):
    path = save_mrc(tmp_path / "lonely.mrc", np.ones((2, 4, 4)), voxel_size=0.3)
    with raises_input_error(path, "no tilt angles", "lonely.tlt", "lonely.rawtlt"):
        read_tilt_series(path)


def test_bad_angle_file(tmp_path):
    path = save_mrc(tmp_path / "s.mrc", np.ones((2, 4, 4)), voxel_size=0.3)
    tlt = write_angles(tmp_path / "s.tlt", ["0.0", "ten"])
    with raises_input_error(tlt, "line 2", "'ten'"):
        read_tilt_series(path)


# ------------------------------------------------------------------------------------------ writing

def test_overwrite_refused_and_original_kept(tmp_path):
    path = write_tilt_series(make_series(), tmp_path / "keep.npz")
    original = path.read_bytes()
    other = make_series(n=3)
    with raises_input_error(path, "already exists"):
        write_tilt_series(other, path)
    assert path.read_bytes() == original
    write_tilt_series(other, path, overwrite=True)
    assert read_tilt_series(path).n_tilts == 3


def test_existing_tlt_blocks_mrc_write(tmp_path):
    tlt = write_angles(tmp_path / "new.tlt", [1, 2, 3])
    before = tlt.read_text()
    with raises_input_error(tlt, "already exists"):
        write_tilt_series(make_series(), tmp_path / "new.mrc")
    assert tlt.read_text() == before and not (tmp_path / "new.mrc").exists()


def test_invalid_series_is_not_written(tmp_path):
    with pytest.raises(InputError, match="pixel size"):
        write_tilt_series(make_series(pixel_size=-1.0), tmp_path / "bad.npz")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ series helpers

def test_subset_and_default_geometry():
    series = make_series(n=5)
    part = series.subset([4, 0])
    np.testing.assert_array_equal(part.angles, [60.0, -60.0])
    np.testing.assert_array_equal(part.projections, series.projections[[4, 0]])
    assert part.geometry is None
    np.testing.assert_allclose(part.get_geometry().rotations, rotation_about_y([60.0, -60.0]))
    assert series.subset(2).projections.shape == (1, 6, 8)  # a single index still gives a stack

    with_geometry = make_series(n=5, geometry=TiltGeometry.from_tilt_angles(np.linspace(-60, 60, 5), shifts=np.eye(5, 2)))
    np.testing.assert_array_equal(with_geometry.subset(slice(1, 3)).geometry.shifts, [[0.0, 1.0], [0.0, 0.0]])


def test_summarize_hand_made():
    projections = np.zeros((4, 2, 3), np.float32)
    projections[0] = [[1, 2, 3], [4, 5, 6]]
    projections[3, 1, 2] = np.nan  # summarize reports it; statistics skip it
    series = TiltSeries(projections, [0.0, 30.0, -45.0, 15.0], pixel_size=0.5, noise_sigma=0.1, source="hand")
    info = summarize(series)
    assert info["n_tilts"] == 4 and (info["height"], info["width"]) == (2, 3)
    assert (info["angle_min"], info["angle_max"]) == (-45.0, 30.0)
    assert info["angle_step"] == 15.0  # sorted spacings 45, 15, 15 (acquisition order would give 30)
    assert info["missing_wedge_deg"] == 105.0 and info["single_axis"] is True
    assert info["field_of_view_A"] == (1.5, 1.0)
    assert (info["intensity_min"], info["intensity_max"]) == (0.0, 6.0)
    assert info["intensity_mean"] == pytest.approx(21.0 / 23.0)
    assert info["nan_count"] == 1
    assert (info["pixel_size"], info["noise_sigma"], info["blur_sigma"], info["source"]) == (0.5, 0.1, None, "hand")


def test_summarize_full_coverage_and_dual_axis():
    assert summarize(make_series(n=7, angles=np.linspace(-100, 100, 7)))["missing_wedge_deg"] == 0.0
    angles = np.array([-30.0, 0.0, 30.0, -30.0, 0.0, 30.0])
    rotations = np.concatenate([rotation_about_y(angles[:3]),
                                np.stack([euler_zyz(90, a, -90) for a in angles[3:]])])
    axes = np.array([[0, 1]] * 3 + [[-1, 0]] * 3, dtype=float)
    dual = make_series(n=6, angles=angles, geometry=TiltGeometry(rotations, None, axes))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repeated angles are expected in a dual-axis series
        assert dual.validate() == []
    info = summarize(dual)
    assert info["single_axis"] is False and info["missing_wedge_deg"] is None


def test_scene_reads_a_mat_series_by_key_and_layout(tmp_path):
    """A scene's [data] takes mat_key, layout and angles naming a variable of the .mat."""
    from engine.scene import load_scene

    written = make_series()
    save_mat(tmp_path / "tomo.mat", "v5", a=written.projections, b=written.projections, theta=written.angles,
             pixel_size=np.float64(0.3))
    scene_file = tmp_path / "s.toml"
    scene_file.write_text('[data]\nfile = "tomo.mat"\nmat_key = "b"\nlayout = "kyx"\nangles = "theta"\n')
    scene = load_scene(scene_file)
    read = read_tilt_series(scene.data_file, angles_file=scene.angles_file, mat_key=scene.mat_key, layout=scene.layout)
    assert_same_images(read, written)
