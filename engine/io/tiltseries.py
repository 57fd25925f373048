"""Tilt series: the projection images, their tilt angles and pixel size, read from and written to disk.

Formats:
- ``.npz``, the data contract (shared/data/README.md): keys ``projections`` (n, H, W), ``angles``
  (n,) degrees, ``pixel_size`` Å; optional ``noise_sigma``, ``blur_sigma_A``, ``description`` and
  atomsplat's explicit geometry ``rotations`` (n, 3, 3), ``shifts`` (n, 2) Å, ``tilt_axes`` (n, 2).
- MRC stacks ``.mrc``, ``.st``, ``.mrcs`` (pixel size from the header) and multi-page TIFF ``.tif``,
  ``.tiff``, both with IMOD-style angle files beside them (``STEM.tlt`` or ``STEM.rawtlt``: one angle
  in degrees per line).
- MATLAB ``.mat`` files as AET groups publish them: v5/v7 through scipy.io, v7.3 (HDF5) through
  h5py. The projections are the only 3D numeric array (or the one named by `mat_key`), the angles
  the only other numeric vector with one value per projection (or the variable or file named by
  `angles_file`), the pixel size a scalar named ``pixel_size`` or ``pixelsize`` (else `pixel_size`).

Image layout follows GEOMETRY.md: ``P[k, row, col]``, col ↔ x', row ↔ y' (layout ``kyx``). Arrays are
taken as stored, with no flips, in the axis order `layout` names: ``kyx`` by default, ``xyk``
(MATLAB's x-by-y-by-projection) for .mat files. Every bad input raises InputError naming the file
or option and what is wrong with it.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import imageio.v3 as iio
import mrcfile
import numpy as np

from engine.core.errors import InputError
from engine.core.files import write_atomically
from engine.core.geometry import TiltGeometry

MRC_SUFFIXES = (".mrc", ".st", ".mrcs")
TIFF_SUFFIXES = (".tif", ".tiff")
ANGLE_SUFFIXES = (".tlt", ".rawtlt")
MAT_SUFFIX = ".mat"
LAYOUT = "kyx"
"""The internal axis order of the projection stack: projection, row (y'), column (x')."""
DEFAULT_LAYOUTS = {MAT_SUFFIX: "xyk"}
"""Stored axis order by format where it is not `LAYOUT`: MATLAB arrays are x by y by projection."""
MAT_PIXEL_NAMES = ("pixel_size", "pixelsize")
GEOMETRY_KEYS = ("rotations", "shifts", "tilt_axes")


@dataclass
class TiltSeries:
    """A tilt series: n projection images of one specimen and the orientation of each.

    Parameters
    ----------
    projections : np.ndarray
        Images ``P[k, row, col]``, shape (n_tilts, H, W), float32, in the data's own units
        (projected potential [V·Å] for simulated data). col ↔ x', row ↔ y' (GEOMETRY.md).
    angles : np.ndarray
        Tilt angle of each projection [degrees], shape (n_tilts,), float64.
    pixel_size : float
        Image sampling [Å].
    geometry : TiltGeometry, optional
        Explicit per-projection rotations, in-plane shifts [Å] and tilt axes (dual-axis, refined
        alignment). If None, the contract's single-axis geometry (tilt axis +y) follows from `angles`.
    noise_sigma : float, optional
        Standard deviation of the additive noise [projection units], if known.
    blur_sigma : float, optional
        Standard deviation of the microscope's Gaussian blur [Å], if known.
    description : str
        Free text describing the data.
    source : str, optional
        File the series was read from; error messages name it.
    """

    projections: np.ndarray
    angles: np.ndarray
    pixel_size: float
    geometry: TiltGeometry | None = None
    noise_sigma: float | None = None
    blur_sigma: float | None = None
    description: str = ""
    source: str | None = None

    def __post_init__(self):
        try:
            projections = np.asarray(self.projections)
            angles = np.asarray(self.angles)
            if projections.dtype.kind == "c" or angles.dtype.kind == "c":
                what = "projections" if projections.dtype.kind == "c" else "angles"
                raise InputError(self._label, f"the {what} are complex numbers ({np.asarray(getattr(self, what)).dtype}); "
                                              "expected real values (take the amplitude or the real part first)")
            if projections.dtype.kind == "f" and projections.dtype.itemsize > 4 and projections.size:
                ok = np.isfinite(projections)
                largest = max(float(np.max(projections, where=ok, initial=0.0)),
                              -float(np.min(projections, where=ok, initial=0.0)))
                if largest > float(np.finfo(np.float32).max):
                    raise InputError(self._label, f"projection values up to {largest:.3g} exceed the range of the "
                                                  f"32-bit floats images are kept in (±{np.finfo(np.float32).max:.3g}); "
                                                  "rescale the data")
            self.projections = projections.astype(np.float32, copy=False)
            self.angles = angles.astype(np.float64, copy=False)
        except (TypeError, ValueError) as err:
            if isinstance(err, InputError):
                raise
            raise InputError(self._label, f"projections and angles must be numeric arrays ({err})") from err

    @property
    def _label(self) -> str:
        return self.source or "tilt series"

    @property
    def n_tilts(self) -> int:
        """Number of projections."""
        return len(self.projections)

    @property
    def shape(self) -> tuple[int, int]:
        """Image size (H, W) [pixels]."""
        return tuple(self.projections.shape[1:])

    def get_geometry(self) -> TiltGeometry:
        """The explicit geometry if set, else the single-axis geometry of `angles` (tilt axis +y)."""
        return self.geometry if self.geometry is not None else TiltGeometry.from_tilt_angles(self.angles)

    def validate(self, finite: bool = True) -> list[str]:
        """Check the series is usable for reconstruction.

        finite : bool
            Refuse NaN and inf pixels (default); False lets a summary count them.

        Returns
        -------
        list of str
            Soft problems (angles not monotonic, duplicate angles, angles outside −90..90° or
            spanning more than 180°), each also emitted with
            ``warnings.warn``. Empty when there are none.

        Raises
        ------
        InputError
            Naming `source` and the problem, for a stack that is not 3D or is empty, NaN or inf
            pixels, an angle count differing from the projection count, non-finite angles, a missing
            or non-positive pixel size, a negative noise or blur sigma, or a geometry of the wrong length.
        """
        p, a = self.projections, self.angles
        if p.ndim != 3:
            raise InputError(self._label, f"projections are {p.ndim}D {p.shape}; expected a 3D stack (n_tilts, H, W)")
        if p.size == 0:
            raise InputError(self._label, f"the projection stack is empty (shape {p.shape})")
        finite_pixels = np.isfinite(p)
        if finite and not finite_pixels.all():
            bad_per_image = np.count_nonzero(~finite_pixels, axis=(1, 2))
            n_nan = int(np.count_nonzero(np.isnan(p)))
            n_inf = int(bad_per_image.sum()) - n_nan
            first = int(np.flatnonzero(bad_per_image)[0])
            raise InputError(self._label, f"projections contain {n_nan} NaN and {n_inf} inf values; "
                                          f"the first is in projection index {first}")
        if a.ndim != 1:
            raise InputError(self._label, f"angles have shape {a.shape}; expected one angle per projection")
        if len(a) != len(p):
            raise InputError(self._label, f"{len(a)} tilt angles for {len(p)} projections; "
                                          "need exactly one angle per projection")
        bad_angles = np.flatnonzero(~np.isfinite(a))
        if bad_angles.size:
            raise InputError(self._label, f"{bad_angles.size} non-finite tilt angles; "
                                          f"angle index {bad_angles[0]} is {a[bad_angles[0]]}")
        if self.pixel_size is None:
            raise InputError(self._label, "no pixel size; pass it with --pixel (Å)")
        if not np.isfinite(self.pixel_size) or self.pixel_size <= 0:
            raise InputError(self._label, f"pixel size must be a positive finite number of Å, got {self.pixel_size}")
        for name in ("noise_sigma", "blur_sigma"):
            value = getattr(self, name)
            if value is not None and not (np.isfinite(value) and value >= 0):
                raise InputError(self._label, f"{name} must be a finite number >= 0, got {value}")
        if self.geometry is not None and len(self.geometry) != len(p):
            raise InputError(self._label, f"the geometry describes {len(self.geometry)} projections "
                                          f"but the stack has {len(p)}")

        issues = _angle_order_issues(a) if _is_single_axis(self) else []
        for issue in issues:
            warnings.warn(f"{self._label}: {issue}", UserWarning, stacklevel=2)
        return [f"{self._label}: {issue}" for issue in issues]

    def subset(self, indices) -> TiltSeries:
        """A new series of the projections selected by `indices` (int, slice, index list or bool mask)."""
        idx = np.atleast_1d(np.arange(self.n_tilts)[indices])
        return replace(self, projections=self.projections[idx], angles=self.angles[idx],
                       geometry=None if self.geometry is None else self.geometry.subset(idx))


def _is_single_axis(series: TiltSeries) -> bool:
    """Whether every projection is a tilt about one common in-plane axis by its angle in `angles`."""
    g = series.geometry
    if g is None:
        return True
    if len(g) != len(series.angles) or len(g) == 0 or not np.allclose(g.tilt_axes, g.tilt_axes[0]):
        return False
    # The axis (−sin φ, cos φ) gives φ; the rotations must then be exactly the tilts by `angles`.
    phi = np.rad2deg(np.arctan2(-g.tilt_axes[0, 0], g.tilt_axes[0, 1]))
    expected = TiltGeometry.from_tilt_angles(series.angles, axis_angle_deg=phi)
    return bool(np.allclose(g.rotations, expected.rotations, atol=1e-6))


def require_tomography(series: TiltSeries) -> TiltSeries:
    """Refuse a series that cannot give a 3D reconstruction: one projection, or every projection at
    the same orientation. InputError naming the source."""
    if series.n_tilts < 2:
        raise InputError(series._label, f"only {series.n_tilts} projection: a 3D reconstruction needs a tilt series "
                                        "(projections at several tilt angles)")
    g = series.get_geometry()
    if np.allclose(g.rotations, g.rotations[0], atol=1e-9):
        raise InputError(series._label, f"all {series.n_tilts} projections are at the same orientation "
                                        f"(tilt {series.angles[0]:g}°): a 3D reconstruction needs several tilt angles")
    return series


def _angle_order_issues(angles: np.ndarray) -> list[str]:
    """Soft problems of a single-axis angle list: a change of direction, repeated angles, angles
    outside −90..90° or spanning more than 180°."""
    issues = []
    low, high = float(angles.min()), float(angles.max())
    if high - low > 180 + 1e-6:
        issues.append(f"tilt angles span {high - low:g}° ({low:g}..{high:g}°), more than 180°: projections "
                      "beyond 180° repeat others mirrored; check the angles' unit and offset")
    elif low < -90 - 1e-6 or high > 90 + 1e-6:
        issues.append(f"tilt angles {low:g}..{high:g}° lie outside −90..90°; check the angles' offset "
                      "(they are used as given)")
    steps = np.sign(np.diff(angles))
    moving = steps[steps != 0]
    if moving.size:
        reversals = np.flatnonzero(steps == -moving[0])
        if reversals.size:
            k = int(reversals[0]) + 1
            issues.append(f"tilt angles are not monotonic (first change of direction at projection index {k}: "
                          f"{angles[k - 1]:g}° → {angles[k]:g}°)")
    values, counts = np.unique(angles, return_counts=True)
    if np.any(counts > 1):
        repeated = ", ".join(f"{v:g}° ×{c}" for v, c in zip(values[counts > 1], counts[counts > 1]))
        issues.append(f"duplicate tilt angles: {repeated}")
    return issues


# ---------------------------------------------------------------------------------------------- reading

def read_tilt_series(path, pixel_size: float | None = None, angles_file=None, finite: bool = True,
                     mat_key: str | None = None, layout: str | None = None) -> TiltSeries:
    """Read and validate a tilt series from .npz, MRC (.mrc, .st, .mrcs), TIFF (.tif, .tiff) or MATLAB (.mat).

    Parameters
    ----------
    path : str or os.PathLike
        The tilt-series file.
    pixel_size : float, optional
        Pixel size [Å]. Overrides the value stored in the file (with a warning if they differ);
        required for TIFF and for files that store none.
    angles_file : str or os.PathLike, optional
        Text file with one tilt angle [degrees] per line (IMOD .tlt), or a .mat file holding one
        vector; for a .mat series also the name of a variable in it. Overrides the angles stored in
        the file. Without it, angles come from the .npz or the .mat, else from ``STEM.tlt`` or
        ``STEM.rawtlt`` beside `path` (`--angles FILE|KEY` on the command line).
    finite : bool
        Refuse NaN and inf pixels (default); False reads them (for a summary).
    mat_key : str, optional
        The variable of a .mat file that holds the projections (default: its only 3D numeric array).
    layout : str, optional
        Axis order of the stored array, a permutation of ``k`` (projection), ``y`` (row, along the
        tilt axis) and ``x`` (column): default ``kyx`` (GEOMETRY.md), ``xyk`` for .mat.

    Returns
    -------
    TiltSeries
        Validated, with `source` set to `path`. Soft problems are emitted as warnings.

    Raises
    ------
    InputError
        Naming the file or option, for a missing, unreadable, truncated, ambiguous or inconsistent input.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    reader = _READERS.get(suffix)
    if reader is None:
        raise InputError(path, f"unknown tilt-series format {suffix or '(no extension)'!r}; "
                               f"supported: {', '.join(_READERS)}")
    if mat_key is not None and suffix != MAT_SUFFIX:
        raise InputError("--mat-key", f"names a variable of a .mat series; {path.name} is not a .mat file")
    layout = check_layout(layout if layout is not None else DEFAULT_LAYOUTS.get(suffix, LAYOUT))
    if not path.is_file():
        raise InputError(path, "file not found" if not path.exists() else "not a regular file")

    if suffix == MAT_SUFFIX:
        fields = _read_mat(path, mat_key, angles_file, layout)
        angles_file = None if fields["angles"] is not None else angles_file
    else:
        fields = reader(path)
        fields["projections"] = to_internal_layout(fields["projections"], layout, path)
    stored_pixel = fields.pop("pixel_size")
    if pixel_size is not None and stored_pixel is not None and not np.isclose(pixel_size, stored_pixel):
        warnings.warn(f"{path}: using the given pixel size {pixel_size} Å instead of {stored_pixel} Å "
                      "stored in the file", UserWarning, stacklevel=2)
    if angles_file is not None:
        fields["angles"] = _read_angle_file(angles_file)
    elif fields["angles"] is None:
        fields["angles"] = _read_angle_file(_find_angle_file(path))

    series = TiltSeries(**fields, pixel_size=pixel_size if pixel_size is not None else stored_pixel,
                        source=str(path))
    series.validate(finite=finite)
    return series


def check_layout(layout) -> str:
    """A stored axis order: each of k (projection), y (row) and x (column) once; InputError naming --layout."""
    if not isinstance(layout, str) or sorted(layout.lower()) != sorted(LAYOUT):
        raise InputError("--layout", f"{layout!r} must name each of k (projection), y (row, along the tilt axis) "
                                     "and x (column) once, e.g. xyk (MATLAB's x by y by projection) or kyx "
                                     "(projection, row, column: the .npz order)")
    return layout.lower()


def to_internal_layout(array: np.ndarray, layout: str, path) -> np.ndarray:
    """The stored 3D ``array`` with axes in the order ``layout`` as ``P[k, row, col]`` .
    Arrays that are not 3D are returned as they are (validation reports them)."""
    array = np.asarray(array)
    if layout == LAYOUT or array.ndim != 3:
        return array
    return np.ascontiguousarray(np.transpose(array, [layout.index(axis) for axis in LAYOUT]))


@contextmanager
def _reading(path: Path, what: str):
    """Turn any failure of a file-format library into an InputError naming the file."""
    try:
        yield
    except InputError:
        raise
    except Exception as err:  # decoders raise anything from OSError to struct.error on bad bytes
        raise InputError(path, f"cannot read as {what}: truncated, corrupt or another format "
                               f"({type(err).__name__}: {err})") from err


def _number(value: np.ndarray, key: str, path: Path) -> float:
    """A scalar .npz entry as float."""
    if value.size != 1 or value.dtype.kind not in "iuf":
        raise InputError(path, f"'{key}' must be a single number, got {value.dtype} array of shape {value.shape}")
    return float(value.reshape(()))


def _read_npz(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            head = fh.read(6)
    except OSError as err:
        raise InputError(path, f"cannot read the file ({err.strerror or err})") from None
    if not head.startswith(b"PK"):
        what = ("a single NumPy array (.npy), not an .npz archive" if head.startswith(b"\x93NUMPY")
                else "empty" if not head else "not an .npz archive (a zip of NumPy arrays)")
        raise InputError(path, f"{what}; expected the arrays projections, angles and pixel_size")
    with _reading(path, "an .npz archive"):
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise InputError(path, "holds a single array, not an .npz archive with keys projections, angles, pixel_size")
        with archive:
            arrays = {key: archive[key] for key in archive.files}
    if "projections" not in arrays:
        raise InputError(path, f"no 'projections' array in the archive (keys: {', '.join(sorted(arrays)) or 'none'})")

    geometry = None
    if "rotations" in arrays:
        try:
            geometry = TiltGeometry(arrays["rotations"], arrays.get("shifts"), arrays.get("tilt_axes"))
        except InputError as err:
            raise InputError(path, f"geometry: {err.problem}") from err

    def optional(key):
        return _number(arrays[key], key, path) if key in arrays else None

    return dict(projections=arrays["projections"], angles=arrays.get("angles"), pixel_size=optional("pixel_size"),
                geometry=geometry, noise_sigma=optional("noise_sigma"), blur_sigma=optional("blur_sigma_A"),
                description=str(arrays.get("description", "")))


def _read_mrc(path: Path) -> dict:
    with _reading(path, "an MRC file"):
        with mrcfile.open(path, mode="r", permissive=False) as mrc:
            projections = np.array(mrc.data, dtype=np.float32)
            voxel = float(mrc.voxel_size.x)
    # The header stores float32: 7 significant digits give back the decimal value that was written.
    return dict(projections=projections, angles=None, pixel_size=float(f"{voxel:.7g}") if voxel > 0 else None)


def _read_tiff(path: Path) -> dict:
    with _reading(path, "a TIFF image"):
        projections = np.asarray(iio.imread(path, index=None), dtype=np.float32)
    return dict(projections=projections, angles=None, pixel_size=None)


class _MatFile:
    """The numeric variables of a MATLAB file, listed without loading them: v7.3 (HDF5) through h5py,
    older versions through scipy.io. Shapes and arrays in MATLAB's own axis order."""

    def __init__(self, path: Path):
        import h5py
        from scipy import io as sio

        self.path = path
        self.hdf5 = h5py.is_hdf5(path)
        with _reading(path, "a MATLAB v7.3 (HDF5) file" if self.hdf5 else "a MATLAB .mat file"):
            if self.hdf5:
                with h5py.File(path, "r") as f:
                    # HDF5 keeps MATLAB's column-major arrays with the axes reversed
                    listing = [(name, tuple(reversed(item.shape)), _hdf5_numeric(item))
                               for name, item in f.items() if isinstance(item, h5py.Dataset)]
            else:
                listing = [(name, tuple(shape), kind not in ("char", "cell", "struct", "object", "sparse",
                                                              "function_handle", "opaque"))
                           for name, shape, kind in sio.whosmat(str(path))]
        self.shapes = {name: shape for name, shape, _ in listing}
        self.numeric = {name: shape for name, shape, numeric in listing if numeric and int(np.prod(shape)) > 0}

    def describe(self) -> str:
        """The variables and their shapes, for error messages."""
        return ", ".join(f"{name} ({'x'.join(map(str, shape))})" for name, shape in self.shapes.items()) or "none"

    def load(self, name: str) -> np.ndarray:
        import h5py
        from scipy import io as sio

        with _reading(self.path, "a MATLAB .mat file"):
            if self.hdf5:
                with h5py.File(self.path, "r") as f:
                    array = f[name][()]
                if array.dtype.names is not None and set(array.dtype.names) == {"real", "imag"}:
                    array = array["real"] + 1j * array["imag"]  # MATLAB v7.3 complex numbers
                return np.asarray(array).T
            return np.asarray(sio.loadmat(str(self.path), variable_names=[name])[name])


def _hdf5_numeric(dataset) -> bool:
    """Whether an HDF5 dataset is a MATLAB numeric array (not text, logical-empty or a reference)."""
    kind = dataset.attrs.get("MATLAB_class", b"")
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    if kind in ("char", "cell", "struct", "function_handle") or "MATLAB_empty" in dataset.attrs:
        return False
    names = dataset.dtype.names
    return dataset.dtype.kind in "iufb" or (names is not None and set(names) == {"real", "imag"})


def _vector_length(shape: tuple) -> int | None:
    """The length of an array with at most one axis longer than 1 (MATLAB's 1 x n or n x 1), else None."""
    long_axes = [n for n in shape if n != 1]
    return (long_axes[0] if long_axes else 1) if len(long_axes) <= 1 else None


def _read_mat(path: Path, array_key: str | None, angles_option, layout: str) -> dict:
    """Projections, angles (None when neither stored unambiguously nor named as a variable) and pixel
    size (None without a scalar named in MAT_PIXEL_NAMES) of a MATLAB file."""
    mat = _MatFile(path)
    if array_key is not None:
        if array_key not in mat.shapes:
            raise InputError("--mat-key", f"{path} has no variable {array_key!r} (variables: {mat.describe()})")
        if len(mat.numeric.get(array_key, ())) != 3:
            raise InputError("--mat-key", f"{array_key!r} in {path} is not a 3D numeric array "
                                          f"(shape {'x'.join(map(str, mat.shapes[array_key]))})")
    else:
        stacks = [name for name, shape in mat.numeric.items() if len(shape) == 3]
        if len(stacks) != 1:
            raise InputError(path, f"{'no' if not stacks else len(stacks)} 3D numeric arrays to take as the "
                                   f"projections (variables: {mat.describe()}); name one with --mat-key")
        array_key = stacks[0]
    n_tilts = mat.shapes[array_key][layout.index("k")]

    angles_key = None
    if angles_option is not None:
        if str(angles_option) in mat.shapes:
            angles_key = str(angles_option)
            if _vector_length(mat.numeric.get(angles_key, ())) is None:
                raise InputError("--angles", f"{angles_key!r} in {path} is not a numeric vector (shape "
                                             f"{'x'.join(map(str, mat.shapes[angles_key]))}); expected one tilt "
                                             "angle in degrees per projection")
    else:
        vectors = [name for name, shape in mat.numeric.items()
                   if name != array_key and n_tilts > 1 and _vector_length(shape) == n_tilts]
        if len(vectors) > 1:
            raise InputError(path, f"{len(vectors)} vectors of {n_tilts} values could be the tilt angles "
                                   f"({', '.join(vectors)}); name one with --angles KEY")
        angles_key = vectors[0] if vectors else None
    pixel_keys = [name for name, shape in mat.numeric.items()
                  if name.lower() in MAT_PIXEL_NAMES and int(np.prod(shape)) == 1]
    pixel = _number(mat.load(pixel_keys[0]), pixel_keys[0], path) if pixel_keys else None
    return dict(projections=to_internal_layout(mat.load(array_key), layout, path), pixel_size=pixel,
                angles=None if angles_key is None else mat.load(angles_key).reshape(-1),
                description=f"{path.name}: {array_key}" + (f", angles {angles_key}" if angles_key else ""))


_READERS = {".npz": _read_npz, **{s: _read_mrc for s in MRC_SUFFIXES}, **{s: _read_tiff for s in TIFF_SUFFIXES},
            MAT_SUFFIX: _read_mat}


def _find_angle_file(path: Path) -> Path:
    """The IMOD angle file beside a stack: STEM.tlt, else STEM.rawtlt."""
    candidates = [path.with_suffix(s) for s in ANGLE_SUFFIXES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise InputError(path, f"no tilt angles: none stored in the file and neither "
                           f"{' nor '.join(c.name for c in candidates)} exists beside it; "
                           "pass --angles FILE (one angle in degrees per line)"
                           + (" or --angles KEY (a variable of the .mat)" if path.suffix.lower() == MAT_SUFFIX else ""))


def _read_angle_file(path) -> np.ndarray:
    """Tilt angles [degrees] from an IMOD-style text file, one per line (blank lines are skipped), or
    from a .mat file's only numeric vector."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "angle file not found" if not path.exists() else "the angle file is not a regular file")
    if path.suffix.lower() == MAT_SUFFIX:
        mat = _MatFile(path)
        vectors = [name for name, shape in mat.numeric.items() if (_vector_length(shape) or 0) > 1]
        if len(vectors) != 1:
            raise InputError(path, f"{'no' if not vectors else len(vectors)} numeric vectors to take as the tilt "
                                   f"angles (variables: {mat.describe()}); expected exactly one")
        return mat.load(vectors[0]).reshape(-1).astype(np.float64)
    try:
        text = path.read_text()
    except OSError as err:
        raise InputError(path, f"cannot read the angle file ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise InputError(path, "the angle file is not text (expected one angle in degrees per line)") from None
    angles = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                angles.append(float(line))
            except ValueError as err:
                raise InputError(path, f"line {number}: {line.strip()!r} is not an angle in degrees "
                                       "(expected one number per line)") from err
    if not angles:
        raise InputError(path, "the angle file holds no angles (expected one angle in degrees per line)")
    return np.asarray(angles, dtype=np.float64)


def add_series_arguments(parser, what: str = "the series") -> None:
    """The options of every command that reads a tilt series (`series_arguments` gives them back as
    `read_tilt_series` keywords)."""
    parser.add_argument("--pixel", type=float, default=None, help=f"pixel size of {what} in Å when the file has none")
    parser.add_argument("--angles", metavar="FILE|KEY", default=None,
                        help=f"tilt angles of {what} in degrees: a text file, one per line (IMOD .tlt), or a "
                             ".mat file holding one vector; for a .mat series also the name of a variable in it. "
                             "Replaces the angles stored in the series file")
    parser.add_argument("--mat-key", metavar="KEY", default=None,
                        help="the variable of a .mat series holding the projections (default: its only 3D array)")
    parser.add_argument("--layout", metavar="ORDER", default=None,
                        help="axis order of the stored projection array, a permutation of k (projection), y (row, "
                             "along the tilt axis) and x (column): default kyx, xyk (MATLAB's x by y by "
                             "projection) for .mat")


def series_arguments(args) -> dict:
    """The `read_tilt_series` keywords of the options `add_series_arguments` added."""
    return dict(pixel_size=args.pixel, angles_file=args.angles, mat_key=args.mat_key, layout=args.layout)


# ---------------------------------------------------------------------------------------------- writing

def check_series_path(path, source=None) -> Path:
    """A path a tilt series can be written to: .npz or an MRC suffix; InputError naming ``source``
    (default: the path) otherwise."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix != ".npz" and suffix not in MRC_SUFFIXES:
        raise InputError(source or path, f"cannot write a tilt series as {suffix or '(no extension)'!r}; "
                                         f"give a file ending in .npz or {', '.join(MRC_SUFFIXES)}")
    return path


def write_tilt_series(series: TiltSeries, path, overwrite: bool = False) -> Path:
    """Write a validated tilt series as .npz or as an MRC stack (.mrc, .st, .mrcs) with a .tlt beside it.

    The .npz keeps everything (geometry included); MRC keeps the images and pixel size [Å] in the
    header, and the angles [degrees] in ``STEM.tlt``. Each file is written to a temporary file in the
    same directory and then renamed, so an interrupted write leaves any previous file intact.

    Parameters
    ----------
    series : TiltSeries
        The series to write; validated first.
    path : str or os.PathLike
        Output file; the extension picks the format.
    overwrite : bool
        Replace existing files. Without it, an existing output (or .tlt) is an error.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix != ".npz" and suffix not in MRC_SUFFIXES:
        raise InputError(path, f"cannot write format {suffix or '(no extension)'!r}; "
                               f"supported: .npz, {', '.join(MRC_SUFFIXES)}")
    if not path.parent.is_dir():
        raise InputError(path, f"the directory {path.parent} does not exist")
    series.validate()

    targets = [path] if suffix == ".npz" else [path, path.with_suffix(".tlt")]
    if not overwrite:
        for target in targets:
            if target.exists():
                raise InputError(target, "already exists; not overwriting it (ask explicitly to overwrite)")

    if suffix == ".npz":
        write_atomically(path, lambda tmp: _write_npz(series, tmp))
    else:
        if series.geometry is not None:
            warnings.warn(f"{path}: MRC with .tlt keeps only the tilt angles; the explicit per-projection "
                          "geometry is not written (write .npz to keep it)", UserWarning, stacklevel=2)
        write_atomically(path, lambda tmp: _write_mrc(series, tmp))
        text = "".join(f"{float(a)!r}\n" for a in series.angles)
        write_atomically(targets[1], lambda tmp: tmp.write_text(text))
    return path


def _write_npz(series: TiltSeries, tmp: Path) -> None:
    arrays = dict(projections=series.projections.astype(np.float32, copy=False),
                  angles=series.angles.astype(np.float64, copy=False),
                  pixel_size=float(series.pixel_size), description=series.description)
    if series.noise_sigma is not None:
        arrays["noise_sigma"] = float(series.noise_sigma)
    if series.blur_sigma is not None:
        arrays["blur_sigma_A"] = float(series.blur_sigma)
    if series.geometry is not None:
        arrays.update({key: getattr(series.geometry, key) for key in GEOMETRY_KEYS})
    with open(tmp, "xb") as fh:  # a file object keeps np.savez from appending ".npz" to the name
        np.savez(fh, **arrays)


def _write_mrc(series: TiltSeries, tmp: Path) -> None:
    with mrcfile.new(tmp) as mrc:
        mrc.set_data(series.projections.astype(np.float32, copy=False))
        mrc.set_image_stack()  # space group 0: a stack of 2D images, not a volume
        mrc.voxel_size = series.pixel_size  # after set_image_stack, which changes the z sampling


# ---------------------------------------------------------------------------------------------- summary

def summarize(series: TiltSeries) -> dict:
    """Key numbers of a tilt series, for ``atomsplat info``.

    Angles in degrees, lengths in Å, intensities in projection units. Intensity statistics skip
    NaN and inf pixels. `missing_wedge_deg` (180° minus the covered range, at least 0) and the other
    angle numbers assume a single-axis series; the wedge is None for an explicit non-single-axis
    geometry. `angle_step` is the median spacing of the sorted angles (None for one projection).
    """
    p, a, s = series.projections, series.angles, series.pixel_size
    height, width = series.shape
    finite = np.isfinite(p)
    values = p if finite.all() else p[finite]
    single_axis = _is_single_axis(series)
    return {
        "n_tilts": series.n_tilts,
        "angle_min": float(a.min()),
        "angle_max": float(a.max()),
        "angle_step": float(np.median(np.diff(np.sort(a)))) if len(a) > 1 else None,
        "missing_wedge_deg": max(0.0, 180.0 - float(a.max() - a.min())) if single_axis else None,
        "single_axis": single_axis,
        "height": height,
        "width": width,
        "pixel_size": s,
        "field_of_view_A": (width * s, height * s),
        "intensity_min": float(values.min()) if values.size else None,
        "intensity_max": float(values.max()) if values.size else None,
        "intensity_mean": float(values.mean(dtype=np.float64)) if values.size else None,
        "nan_count": int(np.count_nonzero(np.isnan(p))),
        "noise_sigma": series.noise_sigma,
        "blur_sigma": series.blur_sigma,
        "source": series.source,
    }
