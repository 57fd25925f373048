"""Atom lists and their files, through ASE (`ase.io`): extended XYZ, PDB, CIF, POSCAR, LAMMPS data, ...

An `Atoms` holds element symbols, positions in the world frame of GEOMETRY.md (Å), optional
per-atom float columns (fitted amplitudes, widths, B-factors, ...) and header key=value pairs.
`Atoms.to_ase` and `Atoms.from_ase` convert to and from `ase.Atoms` (abTEM and every ASE tool take
those). `read_atoms` and `write_atoms` read and write every format ASE knows, chosen by the file
name; extended XYZ keeps the per-atom columns. Readers report every problem as an `InputError`
naming the file and what is wrong; writers never clobber an existing file unless asked and replace
the target atomically.
"""

from __future__ import annotations

import io
import numbers
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import ase
import ase.io
import numpy as np
from ase.io.extxyz import SPECIAL_3_3_KEYS, key_val_str_to_dict, parse_properties, per_atom_properties
from ase.io.formats import filetype, ioformats

from engine.core.elements import SYMBOLS, normalize_symbol
from engine.core.errors import InputError
from engine.core.files import write_atomically

UNKNOWN_SPECIES = "X"
"""Species of an atom whose element is unknown; ASE's dummy atom (atomic number 0) is 'X' too."""

KNOWN_COLUMNS = {
    "amplitude": "integrated projected weight (data units x Å^2)",
    "width": "Gaussian sigma, Å",
    "b_factor": "Debye-Waller B, Å^2",
    "species_prob": "probability of the assigned species",
    "pos_uncertainty": "1-sigma position uncertainty, RMS over x, y, z, Å",
    "sigma_x": "1-sigma position uncertainty along x (the inverse observed information of the fit's likelihood, "
               "the atom with its nearest neighbours; for counts the sandwich with the scores' spread), Å",
    "sigma_y": "1-sigma position uncertainty along y, Å",
    "sigma_z": "1-sigma position uncertainty along z, Å",
    "corr_xy": "correlation of the x and y position errors (the covariance is corr_xy sigma_x sigma_y, Å^2)",
    "corr_xz": "correlation of the x and z position errors",
    "corr_yz": "correlation of the y and z position errors",
    "significance": "log-likelihood gain of the atom over its Occam penalty, nats (> 0: the data support it)",
    "inside": "1: seen by every projection (the always-visible window), 0: in the margin of an extended specimen",
}
"""Per-atom columns with an agreed meaning; any other float column is allowed too."""

EXTXYZ, PDB, LAMMPS_DATA = "extxyz", "proteindatabank", "lammps-data"
FORMATS_BY_SUFFIX = {".xyz": EXTXYZ, ".extxyz": EXTXYZ, ".pdb": PDB,
                     ".lmp": LAMMPS_DATA, ".data": LAMMPS_DATA, ".lammps": LAMMPS_DATA}
"""ASE format of these suffixes; any other name goes to `ase.io.formats.filetype` (.cif, .vasp,
POSCAR, CONTCAR, .xsf, .traj, ...)."""

_PLAIN_PROPERTIES = "species:S:1:pos:R:3"
_RESERVED_COLUMNS = {"species", "pos", "Z", "numbers", "positions", "symbols", "move_mask"}
_BAD_NAME = re.compile(r"""[\s="'\\{}\[\]]""")


@dataclass
class Atoms:
    """
    A list of atoms: species, positions and optional per-atom columns.

    Parameters
    ----------
    species : np.ndarray
        Element symbols, shape (N,), str; 'X' marks an unknown species.
    positions : np.ndarray
        Positions in the world frame (GEOMETRY.md) [Å], shape (N, 3), float64.
    columns : dict of str to np.ndarray
        Optional per-atom values, each shape (N,), float64, e.g. 'amplitude' [data units x Å²],
        'width' (Gaussian σ) [Å], 'b_factor' [Å²]; see `KNOWN_COLUMNS`.
    info : dict of str to str
        Header key=value pairs (extended XYZ comment line), e.g. 'Lattice' (nine numbers: the three
        cell vectors [Å]), 'pbc' ('F F F'), 'dataset'.
    """

    species: np.ndarray
    positions: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        species = np.asarray(self.species, dtype=str).reshape(-1)
        # At least 2 characters, so that assigning 'Pt' into an all-'X' array never truncates.
        self.species = species.astype(f"<U{max(2, species.dtype.itemsize // 4)}")
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(-1, 3)
        n = len(self.species)
        if len(self.positions) != n:
            raise ValueError(f"species has {n} entries but positions has {len(self.positions)} rows")
        self.columns = {str(k): np.asarray(v, dtype=np.float64).reshape(-1) for k, v in self.columns.items()}
        for name, values in self.columns.items():
            if len(values) != n:
                raise ValueError(f"column {name!r} has {len(values)} entries, expected {n}")
        self.info = {str(k): str(v) for k, v in self.info.items()}

    def __len__(self) -> int:
        return len(self.species)

    def copy(self) -> "Atoms":
        """Deep copy (arrays and dicts are not shared)."""
        return Atoms(self.species.copy(), self.positions.copy(),
                     {k: v.copy() for k, v in self.columns.items()}, dict(self.info))

    def subset(self, mask_or_indices) -> "Atoms":
        """
        The atoms selected by a boolean mask (N,) or an integer index array, as a new `Atoms`.

        Parameters
        ----------
        mask_or_indices : array_like
            Boolean mask of shape (N,) or integer indices (any order, repeats allowed).
        """
        sel = np.asarray(mask_or_indices)
        if sel.dtype != bool:
            sel = sel.astype(np.intp)
        return Atoms(self.species[sel], self.positions[sel],
                     {k: v[sel] for k, v in self.columns.items()}, dict(self.info))

    def centered(self) -> "Atoms":
        """A copy translated so that the centroid (unweighted mean position) [Å] is at the origin."""
        out = self.copy()
        if len(out):
            out.positions -= out.positions.mean(axis=0)
        return out

    def to_ase(self) -> ase.Atoms:
        """
        This list as an `ase.Atoms` (copies; 'X' becomes ASE's dummy atom, atomic number 0).

        Every column becomes a per-atom array of that name; `info` 'Lattice' (nine numbers, the
        cell vectors as rows [Å]) becomes the cell and 'pbc' the periodic boundary flags (all
        periodic when a Lattice is given without pbc, as in extended XYZ, else none); the other
        `info` entries go to the `ase.Atoms` info as strings.

        Returns
        -------
        ase.Atoms
            Positions [Å].

        Raises
        ------
        ValueError
            A column named like one of ASE's own arrays ('numbers', 'positions'), a malformed
            'Lattice' or 'pbc' entry, or a species ASE does not know.
        """
        cell, pbc = _cell_and_pbc(self.info)
        try:
            out = ase.Atoms(symbols=self.species.tolist(), positions=self.positions, cell=cell, pbc=pbc)
        except KeyError as err:
            raise ValueError(f"unknown element symbol {err.args[0]!r}") from None
        for name, values in self.columns.items():
            if name in out.arrays:
                raise ValueError(f"column {name!r} clashes with the ase.Atoms array of that name")
            out.new_array(name, values.copy())
        out.info = {k: v for k, v in self.info.items() if k not in ("Lattice", "pbc")}
        return out

    @classmethod
    def from_ase(cls, ase_atoms: ase.Atoms) -> "Atoms":
        """
        An `Atoms` from an `ase.Atoms` (copies).

        Symbols and positions [Å] are taken as they are (ASE's dummy atom is 'X'). Every numeric
        per-atom array other than numbers and positions becomes a column (booleans as 1.0/0.0; a
        k-component array `name` becomes `name_0` ... `name_{k-1}`), and so do the per-atom results
        of an attached calculator (e.g. forces from a file); string arrays are left out. `info`
        gets 'Lattice' and 'pbc' when there is a cell or a periodic direction, the scalar, string
        and array entries of the ASE info and the calculator's other results, all as text.

        Parameters
        ----------
        ase_atoms : ase.Atoms

        Returns
        -------
        Atoms
        """
        n = len(ase_atoms)
        calc_results = dict(getattr(ase_atoms.calc, "results", None) or {})
        per_atom = [(k, v) for k, v in calc_results.items() if k in per_atom_properties]
        per_config = [(k, v) for k, v in calc_results.items() if k not in per_atom_properties]
        columns = {}
        for name, values in list(ase_atoms.arrays.items()) + per_atom:
            values = np.asarray(values)
            if name in ("numbers", "positions") or values.dtype.kind not in "biuf" or values.shape[:1] != (n,):
                continue
            if values.ndim == 1:
                columns[name] = values.astype(np.float64)
            else:
                for k, component in enumerate(values.reshape(n, -1).T):
                    columns[f"{name}_{k}"] = component.astype(np.float64)
        info = {}
        cell, pbc = ase_atoms.cell.array, ase_atoms.pbc
        if cell.any():
            info["Lattice"] = " ".join(str(float(x)) for x in cell.reshape(-1))
        if cell.any() or pbc.any():
            info["pbc"] = _info_text("pbc", pbc)
        for key, value in list(ase_atoms.info.items()) + per_config:
            text = _info_text(str(key), value)
            if text is not None:
                info[str(key)] = text
        return cls(np.asarray(ase_atoms.get_chemical_symbols(), dtype=str), ase_atoms.get_positions(),
                   columns, info)


def _info_text(key: str, value) -> str | None:
    """An info value as extended-XYZ text: T/F for booleans, numbers as Python prints them, arrays
    space-separated (3x3 Lattice, stress and virial in Fortran order, as extended XYZ writes them);
    None for anything else (dicts, space groups, ...)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "T" if value else "F"
    if isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, (list, tuple, np.ndarray)):
        array = np.asarray(value)
        if array.dtype.kind in "biufU":
            flat = array.reshape(-1, order="F" if key in SPECIAL_3_3_KEYS else "C")
            return " ".join(_info_text(key, x) for x in flat)
    return None


_FLAGS = {"T": True, "TRUE": True, "1": True, "F": False, "FALSE": False, "0": False}


def _cell_and_pbc(info: dict[str, str]) -> tuple[np.ndarray | None, list[bool]]:
    """Cell (3, 3) [Å] from info 'Lattice' (or None) and pbc flags from info 'pbc'."""
    cell = None
    if "Lattice" in info:
        try:
            cell = np.array(info["Lattice"].split(), dtype=np.float64).reshape(3, 3)
        except ValueError:
            raise ValueError(f"info 'Lattice' must be nine numbers, got {info['Lattice']!r}") from None
    flags = info.get("pbc", "T" if cell is not None else "F").upper().split()
    if len(flags) not in (1, 3) or any(f not in _FLAGS for f in flags):
        raise ValueError(f"info 'pbc' must be one or three of T/F, got {info['pbc']!r}")
    return cell, [_FLAGS[f] for f in flags] * (3 // len(flags))


# ----------------------------------------------------------------------------------------- reading

def read_atoms(path: str | os.PathLike) -> Atoms:
    """
    Read atoms from any file ASE reads (the first frame), the format chosen by the name.

    .xyz/.extxyz: extended XYZ (or plain XYZ), read by ASE. The comment line's key=value pairs go
    to `info` (as text: values that are numbers, booleans or lists of them come back as Python
    prints them); a comment line without '=' is kept whole as info 'comment'. The `Properties=`
    spec (types S, R, I, L) gives the columns; 'pos:R:3' and 'species:S:1' (or 'Z:I:1') are
    required; every other R/I/L column becomes a float column (see `Atoms.from_ase`; L as 1.0/0.0,
    extra S columns are skipped). The species column also takes atomic numbers. The count line
    must match the atom lines: too few, or an atom line where the next frame's count line should
    be, is an error, as is a line with the wrong number of fields.
    .pdb: ATOM/HETATM records of the first model, read by ASE (element from columns 77-78, else
    the atom name); B-factors become the 'b_factor' column and occupancies the 'occupancy' column
    when not all 1.
    .lmp/.data/.lammps: LAMMPS data (atom style from the comment after 'Atoms', else guessed from
    the number of fields; metal units, Å). Species come from the Masses section; without one they
    are unknown ('X') and the atom types stay in the 'type' column.
    Anything else (.cif, .vasp, POSCAR, CONTCAR, .xsf, .traj, ...): whatever ASE detects, see
    `Atoms.from_ase` for what is kept.

    Parameters
    ----------
    path : str or os.PathLike
        File to read. Positions are read in [Å].

    Returns
    -------
    Atoms

    Raises
    ------
    InputError
        Naming the file: missing or unreadable, unknown format, whatever ASE could not parse, bad
        count line, too few or too many atom lines, wrong number of fields, non-finite
        coordinates, unknown element, no atoms.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "cannot read the file (it is a directory)")
    fmt = _file_format(path, reading=True)
    first_line = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ASE warns about odd but readable files; the checks below judge
            if fmt in (EXTXYZ, PDB):
                text = _read_text(path)
                atoms = _read_xyz(text, path) if fmt == EXTXYZ else _read_pdb(text)
                first_line = 3 if fmt == EXTXYZ else None
            else:
                atoms = _read_other(path, fmt)
    except InputError:
        raise
    except Exception as err:  # ASE raises many kinds (ValueError, KeyError, IndexError, IOError, ...)
        raise InputError(path, f"cannot read it as {ioformats[fmt].description}: {_reason(err)}") from None
    if len(atoms) == 0:
        raise InputError(path, "empty structure (0 atoms)")
    finite = np.all(np.isfinite(atoms.positions), axis=1)
    if not finite.all():
        bad = int(np.argmin(finite))
        where = f"line {bad + first_line}" if first_line else f"atom {bad + 1}"
        raise InputError(path, f"{where}: non-finite position (NaN or inf)")
    if first_line is None:
        atoms.species = _species_from_tokens(atoms.species, path)
    return atoms


def _file_format(path: Path, reading: bool) -> str:
    """The ASE format name for ``path``: `FORMATS_BY_SUFFIX`, else ASE's guess from the name, else
    (reading) from the content."""
    fmt = FORMATS_BY_SUFFIX.get(path.suffix.lower())
    for sniff in (False, True) if reading else (False,):
        if fmt in ioformats:
            break
        try:
            fmt = filetype(str(path), read=sniff)
        except Exception:  # ASE's UnknownFileTypeError, or an unreadable file
            fmt = None
    io_format = ioformats.get(fmt)
    if io_format is None or not (io_format.can_read if reading else io_format.can_write):
        raise InputError(path, f"unknown file type {path.suffix or path.name!r}: not a format ASE "
                               f"{'reads' if reading else 'writes'} (e.g. .xyz, .extxyz, .pdb, .cif, .vasp, "
                               "POSCAR, .lmp)")
    return fmt


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(path, "not a text file (cannot decode it as UTF-8)") from None
    except OSError as err:
        raise InputError(path, f"cannot read the file ({err.strerror or err})") from None


def _reason(err: Exception) -> str:
    """An exception's message on one line (KeyError without its quotes)."""
    if isinstance(err, (StopIteration, EOFError)):
        return "unexpected end of file"
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(text.split()) or type(err).__name__


def _read_xyz(text: str, path: Path) -> Atoms:
    """The first frame of an (extended) XYZ text, parsed by ASE after checking its shape."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise InputError(path, "empty structure (0 atoms)")
    count = lines[0].strip()
    try:
        n = int(count)
    except ValueError:
        raise InputError(path, f"line 1: atom count {count!r} is not an integer") from None
    if n <= 0:
        raise InputError(path, "empty structure (0 atoms)" if n == 0 else f"line 1: atom count {n} is negative")
    if len(lines) - 2 < n:
        raise InputError(path, f"expected {n} atom lines after the comment line, found {max(len(lines) - 2, 0)}")
    after = lines[n + 2].strip() if len(lines) > n + 2 else ""
    if after and not after.isdigit():
        raise InputError(path, f"line {n + 3}: more atom lines than the {n} of the count line "
                               "(only a count line may follow, starting the next frame)")

    comment = lines[1].strip()
    try:  # ASE's key=value parser; free text (no '=') is a plain XYZ comment
        header = key_val_str_to_dict(comment) if "=" in comment else ({"comment": comment} if comment else {})
    except ValueError as err:
        raise InputError(path, f"line 2: {_reason(err)}") from None
    spec = header.pop("Properties", _PLAIN_PROPERTIES)
    parts = str(spec).split(":")
    if len(parts) % 3:
        raise InputError(path, f"line 2: Properties={spec!r} is not a list of name:type:count triples")
    try:
        field_names = parse_properties(spec)[2].names
    except ValueError as err:
        raise InputError(path, f"line 2: bad Properties={spec!r} ({_reason(err)})") from None
    declared = {name: (kind, count) for name, kind, count in zip(parts[0::3], parts[1::3], parts[2::3])}
    if declared.get("pos") != ("R", "3"):
        raise InputError(path, "line 2: Properties needs pos:R:3 (positions)")
    species_field = "species" if declared.get("species") == ("S", "1") else "Z"
    if declared.get(species_field) != (("S", "1") if species_field == "species" else ("I", "1")):
        raise InputError(path, "line 2: Properties needs species:S:1 (or Z:I:1)")

    rows = [line.split() for line in lines[2:2 + n]]
    for i, row in enumerate(rows):
        if len(row) != len(field_names):
            raise InputError(path, f"line {i + 3}: expected {len(field_names)} fields ({spec}), found {len(row)}")
    column = field_names.index(species_field)
    species = _species_from_tokens(np.array([row[column] for row in rows], dtype=str), path, first_line=3)

    # ASE parses everything else. It would turn the species column into symbols and fail on atomic
    # numbers, so it gets that column under another name; the species are the checked ones above.
    ase_spec = ":".join("atomsplat_species" if i % 3 == 0 and p == "species" else p for i, p in enumerate(parts))
    ase_header = dict(header, Properties=ase_spec)
    ase_atoms = ase.io.read(io.StringIO(text), index=0, format=EXTXYZ, properties_parser=lambda _: dict(ase_header))
    atoms = Atoms.from_ase(ase_atoms)
    atoms.species = species
    atoms.info = {}  # from the header itself: ASE moves Lattice, pbc and energy elsewhere
    for key, value in header.items():
        text_value = _info_text(key, value)
        if text_value is not None:
            atoms.info[key] = text_value
    return atoms


def _read_pdb(text: str) -> Atoms:
    ase_atoms = ase.io.read(io.StringIO(text), index=0, format=PDB)
    atoms = Atoms.from_ase(ase_atoms)
    columns = atoms.columns
    columns.pop("residuenumbers", None)
    b_factor = columns.pop("bfactor", None)
    if b_factor is not None and np.any(b_factor != 0.0):
        columns["b_factor"] = b_factor
    if "occupancy" in columns and np.all(columns["occupancy"] == 1.0):
        del columns["occupancy"]
    return atoms


def _read_other(path: Path, fmt: str) -> Atoms:
    ase_atoms = ase.io.read(path, index=0, format=fmt)
    atoms = Atoms.from_ase(ase_atoms)
    if fmt == LAMMPS_DATA and "masses" not in ase_atoms.arrays:
        atoms.species[:] = UNKNOWN_SPECIES  # no Masses: ASE would read type k as element Z = k
    return atoms


def _species_from_tokens(tokens: np.ndarray, path: Path, first_line: int | None = None) -> np.ndarray:
    """Validated, canonically capitalised symbols; atomic numbers are accepted too. 'X' = unknown.

    An unknown element is reported by line (``first_line`` is the line of the first atom) or else
    by atom number.
    """
    unique, inverse = np.unique(np.asarray(tokens, dtype=str), return_inverse=True)
    inverse = inverse.reshape(-1)
    canonical = []
    for j, token in enumerate(unique):
        try:
            if token.upper() == UNKNOWN_SPECIES:
                canonical.append(UNKNOWN_SPECIES)
            elif token.isdigit() and 1 <= int(token) <= len(SYMBOLS):
                canonical.append(SYMBOLS[int(token) - 1])
            else:
                canonical.append(normalize_symbol(str(token), str(path)))
        except InputError as err:
            first = int(np.argmax(inverse == j))
            where = f"line {first + first_line}" if first_line else f"atom {first + 1}"
            raise InputError(path, f"{where}: {err.problem}") from None
    return np.asarray(canonical, dtype="<U2")[inverse]


# ----------------------------------------------------------------------------------------- writing

def write_atoms(atoms: Atoms, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """
    Write atoms to any file ASE writes, the format chosen by the name, atomically.

    .xyz/.extxyz: extended XYZ written by ASE: `Properties=species:S:1:pos:R:3[:name:R:1 ...]` with
    one R:1 entry per column, `info` as further key=value pairs ('Lattice' first when given,
    'pbc' always, 'F F F' unless `info` says otherwise). Positions and columns are written with 8
    decimals (a round trip changes them by up to 5e-9). Column names and info entries must fit
    on the comment line (no spaces, quotes, '=', ':' or backslashes in names; no newlines or
    backslashes in values).
    .pdb: ATOM records written by ASE, element symbol right-justified in columns 77-78, positions
    with 3 decimals (the PDB format's limit: a round trip loses up to 5e-4 Å; coordinates must lie
    in [-999.999, 9999.999] Å), occupancy from the 'occupancy' or 'species_prob' column (else 1.0),
    B-factor from 'b_factor' [Å²] (else 0), both with 2 decimals. Other columns, `info` and the
    cell are not stored.
    .lmp/.data/.lammps: LAMMPS data, atom style atomic, with a Masses section so that species
    survive a round trip; needs a cell (`info` 'Lattice').
    Anything else ASE writes (.cif, .vasp, POSCAR, .xsf, ...): `Atoms.to_ase` written by ASE; some
    formats need a cell.

    Parameters
    ----------
    atoms : Atoms
        Atoms to write; positions [Å].
    path : str or os.PathLike
        Target file.
    overwrite : bool
        Replace an existing file. If False (default) an existing file is an error and is kept.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    fmt = _file_format(path, reading=False)
    if path.exists() and not overwrite:
        raise InputError(path, "file exists; pass overwrite=True (--overwrite) to replace it")
    if not path.parent.is_dir():
        raise InputError(path, f"directory {str(path.parent)!r} does not exist")
    if len(atoms) == 0 and fmt != EXTXYZ:  # an XYZ file of 0 atoms is the answer "no atoms found"
        raise InputError(path, "empty structure (0 atoms), nothing to write")
    if not np.all(np.isfinite(atoms.positions)):
        raise InputError(path, "non-finite position (NaN or inf), refusing to write")
    if fmt == EXTXYZ:
        _check_extxyz_names(atoms, path)
    ase_atoms = _pdb_atoms(atoms, path) if fmt == PDB else _ase_atoms(atoms, path)
    options = {"masses": True} if fmt == LAMMPS_DATA else {}

    def write(tmp: Path) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ase.io.write(tmp, ase_atoms, format=fmt, **options)
        except Exception as err:  # ASE raises many kinds
            hint = "" if "Lattice" in atoms.info else " (no cell given: this format may need info 'Lattice')"
            raise InputError(path, f"cannot write {ioformats[fmt].description}: {_reason(err)}{hint}") from None

    return write_atomically(path, write)


def _ase_atoms(atoms: Atoms, path: Path) -> ase.Atoms:
    try:
        return atoms.to_ase()
    except ValueError as err:
        raise InputError(path, str(err)) from None


def _check_extxyz_names(atoms: Atoms, path: Path) -> None:
    for name in atoms.columns:
        if not name or name in _RESERVED_COLUMNS or _BAD_NAME.search(name) or ":" in name:
            raise InputError(path, f"column name {name!r} cannot be written to extended XYZ")
    for key, value in atoms.info.items():
        if key == "Properties":
            raise InputError(path, "info entry 'Properties' is reserved for the extended XYZ column spec")
        if not key or _BAD_NAME.search(key) or re.search(r"[\n\r\\]", value):
            raise InputError(path, f"info entry {key!r} cannot be written to an extended XYZ header")


def _pdb_atoms(atoms: Atoms, path: Path) -> ase.Atoms:
    """Species, positions, occupancy and B-factor as ASE's PDB writer wants them, without a cell
    (with one it would rotate the positions into the cell's standard orientation)."""
    if np.any(atoms.positions < -999.999) or np.any(atoms.positions > 9999.999):
        raise InputError(path, "coordinates outside the PDB range [-999.999, 9999.999] Å; write .xyz instead")
    n = len(atoms)
    occupancy = atoms.columns.get("occupancy", atoms.columns.get("species_prob", np.ones(n)))
    b_factor = atoms.columns.get("b_factor", np.zeros(n))
    for name, values in (("occupancy", occupancy), ("b_factor", b_factor)):
        if not np.all(np.isfinite(values)) or np.any(values < -99.99) or np.any(values > 999.99):
            raise InputError(path, f"{name} values must be finite and within [-99.99, 999.99] for PDB")
    out = _ase_atoms(Atoms(atoms.species, atoms.positions), path)
    out.set_array("occupancy", np.array(occupancy, dtype=np.float64))
    out.set_array("bfactor", np.array(b_factor, dtype=np.float64))
    return out
