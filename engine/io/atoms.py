"""Atom lists and their files: extended XYZ (.xyz, .extxyz) and PDB (.pdb).

An `Atoms` holds element symbols, positions in the world frame of GEOMETRY.md (Å) and optional
per-atom float columns (fitted amplitudes, widths, B-factors, ...). Readers report every problem
as an `InputError` naming the file, the line and what is wrong; writers never clobber an existing
file unless asked and replace the target atomically.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.core.elements import SYMBOLS, normalize_symbol
from engine.core.errors import InputError
from engine.core.files import write_atomically

UNKNOWN_SPECIES = "X"

KNOWN_COLUMNS = {
    "amplitude": "integrated projected weight (data units x Å^2)",
    "width": "Gaussian sigma, Å",
    "b_factor": "Debye-Waller B, Å^2",
    "species_prob": "probability of the assigned species",
    "pos_uncertainty": "1-sigma position uncertainty, Å",
}
"""Per-atom columns with an agreed meaning; any other float column is allowed too."""

XYZ_SUFFIXES = (".xyz", ".extxyz")
PDB_SUFFIXES = (".pdb",)


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
        Header key=value pairs (extended XYZ comment line), e.g. 'Lattice', 'pbc', 'dataset'.
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


# ----------------------------------------------------------------------------------------- reading

def read_atoms(path: str | os.PathLike) -> Atoms:
    """
    Read atoms from an XYZ (plain or extended, first frame) or PDB file, chosen by extension.

    Extended XYZ: the comment line's key=value pairs (quoted values allowed) go to `info`; the
    `Properties=` spec (types S, R, I, L) gives the columns, 'species' (or atomic numbers 'Z') and
    'pos' are required, every other R/I/L column is kept as a float column (a k-component column
    `name:R:k` becomes `name_0` ... `name_{k-1}`; L as 1.0/0.0; extra S columns are skipped). A
    comment line without `Properties=` means four fields per atom: species x y z.
    PDB: ATOM/HETATM records of the first model; element from columns 77-78 (atom name if blank);
    B-factors become the 'b_factor' column and occupancies the 'occupancy' column when not all 1.

    Parameters
    ----------
    path : str or os.PathLike
        File to read; `.xyz`/`.extxyz` or `.pdb`. Positions are read in [Å].

    Returns
    -------
    Atoms

    Raises
    ------
    InputError
        Naming the file: missing or unreadable, bad count line, too few atom lines, wrong number
        of fields, non-numeric or non-finite coordinates, unknown element, no atoms, unknown
        extension.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in XYZ_SUFFIXES + PDB_SUFFIXES:
        raise InputError(path, f"unknown extension {path.suffix!r} (known: {', '.join(XYZ_SUFFIXES + PDB_SUFFIXES)})")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except UnicodeDecodeError:
        raise InputError(path, "not a text file (cannot decode it as UTF-8)") from None
    except OSError as err:
        raise InputError(path, f"cannot read the file ({err.strerror or err})") from None
    return _parse_pdb(text, path) if suffix in PDB_SUFFIXES else _parse_xyz(text, path)


# key=value pairs of an extended-XYZ comment line; a value may be "double" or 'single' quoted
# (with backslash escapes) or {braced}; a bare key means True.
_KEY_VALUE = re.compile(r"""\s*([^\s="']+)(?:\s*=\s*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|\{[^}]*\}|[^\s"']+))?\s*""")
_ESCAPE = re.compile(r"\\(.)")


def _parse_key_values(line: str) -> dict[str, str] | None:
    """The comment line's key=value pairs, or None when it is not in key=value form."""
    pairs, pos = {}, 0
    while pos < len(line):
        match = _KEY_VALUE.match(line, pos)
        if match is None or match.end() == pos:
            return None
        key, value = match.group(1), match.group(2)
        if value is None:
            value = "T"
        elif value[0] in "\"'":
            value = _ESCAPE.sub(r"\1", value[1:-1])
        pairs[key] = value
        pos = match.end()
    return pairs


_PLAIN_SPEC = [("species", "S", 1), ("pos", "R", 3)]


def _parse_properties(spec: str, path: Path) -> list[tuple[str, str, int]]:
    parts = spec.split(":")
    if len(parts) % 3:
        raise InputError(path, f"line 2: Properties={spec!r} is not a list of name:type:count triples")
    props, seen = [], set()
    for name, kind, count in zip(parts[0::3], parts[1::3], parts[2::3]):
        if kind not in "SRIL" or len(kind) != 1 or not count.isdigit() or int(count) < 1:
            raise InputError(path, f"line 2: bad Properties entry {name}:{kind}:{count} "
                                   "(type must be S, R, I or L and count a positive integer)")
        if name in seen:
            raise InputError(path, f"line 2: Properties names {name!r} twice")
        seen.add(name)
        props.append((name, kind, int(count)))
    names = {name: (kind, count) for name, kind, count in props}
    if names.get("pos") != ("R", 3):
        raise InputError(path, "line 2: Properties needs pos:R:3 (positions)")
    if names.get("species") != ("S", 1) and names.get("Z") != ("I", 1):
        raise InputError(path, "line 2: Properties needs species:S:1 (or Z:I:1)")
    return props


def _parse_xyz(text: str, path: Path) -> Atoms:
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise InputError(path, "empty structure (0 atoms)")
    count_text = lines[0].strip()
    try:
        n = int(count_text)
    except ValueError:
        raise InputError(path, f"line 1: atom count {count_text!r} is not an integer") from None
    if n < 0:
        raise InputError(path, f"line 1: atom count {n} is negative")
    if n == 0:
        raise InputError(path, "empty structure (0 atoms)")
    if len(lines) - 2 < n:
        raise InputError(path, f"expected {n} atom lines after the comment line, found {max(len(lines) - 2, 0)}")

    comment = lines[1].strip()
    pairs = _parse_key_values(comment)
    if pairs is None and "properties=" in comment.lower():
        raise InputError(path, "line 2: cannot parse the key=value pairs (unbalanced quotes?)")
    prop_key = next((k for k in pairs or {} if k.lower() == "properties"), None)
    if prop_key is not None:
        props = _parse_properties(pairs.pop(prop_key), path)
        info = pairs
    else:
        props = _PLAIN_SPEC
        # key=value headers without Properties (ase writes these) keep their pairs; free text is a comment
        info = pairs if pairs and "=" in comment else ({"comment": comment} if comment else {})
    n_fields = sum(count for _, _, count in props)
    spec_text = ":".join(f"{name}:{kind}:{count}" for name, kind, count in props)

    rows = [line.split() for line in lines[2:2 + n]]
    for i, row in enumerate(rows):
        if len(row) != n_fields:
            raise InputError(path, f"line {i + 3}: expected {n_fields} fields ({spec_text}), found {len(row)}")
    table = np.array(rows, dtype=str).reshape(n, n_fields)
    line_numbers = np.arange(n) + 3

    species, positions, columns, start = None, None, {}, 0
    for name, kind, count in props:
        block = table[:, start:start + count]
        if name == "species" and kind == "S":
            species = _species_from_tokens(block[:, 0], path, line_numbers)
        elif name == "Z" and kind == "I" and species is None:
            species = _species_from_tokens(block[:, 0], path, line_numbers)
        elif name == "pos":
            positions = _to_float(block, path, start, what="coordinate")
        elif kind != "S":
            values = _to_float(block, path, start, what=f"{name!r} value", logical=(kind == "L"))
            if kind == "I" and not np.all(values == np.round(values)):
                raise InputError(path, f"{name!r} is declared I (integer) but holds non-integer values")
            for k in range(count):
                columns[name if count == 1 else f"{name}_{k}"] = values[:, k]
        start += count
    if not np.all(np.isfinite(positions)):
        bad = int(np.argmin(np.all(np.isfinite(positions), axis=1)))
        raise InputError(path, f"line {bad + 3}: non-finite position (NaN or inf)")
    return Atoms(species, positions, columns, info)


_LOGICAL = {"T": 1.0, "TRUE": 1.0, "1": 1.0, "F": 0.0, "FALSE": 0.0, "0": 0.0}


def _to_float(block: np.ndarray, path: Path, first_field: int, what: str, logical: bool = False) -> np.ndarray:
    """Convert a (N, k) block of XYZ tokens (atom lines from line 3) to float64.

    The first bad token is reported by line and field.
    """
    if logical:
        convert = np.vectorize(lambda t: _LOGICAL.get(t.upper(), np.nan), otypes=[np.float64])
        values = convert(block)
        bad = np.isnan(values)
    else:
        try:
            return block.astype(np.float64)
        except ValueError:
            bad = np.vectorize(lambda t: not _is_float(t), otypes=[bool])(block)
    if bad.any():
        i, k = np.argwhere(bad)[0]
        kind = "T or F" if logical else "a number"
        raise InputError(path, f"line {i + 3}, field {first_field + k + 1}: {what} {str(block[i, k])!r} is not {kind}")
    return values


def _species_from_tokens(tokens: np.ndarray, path: Path, line_numbers: np.ndarray) -> np.ndarray:
    """Validated, canonically capitalised symbols; atomic numbers are accepted too. 'X' = unknown."""
    unique, inverse = np.unique(tokens, return_inverse=True)
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
            line = line_numbers[np.argmax(inverse == j)]
            raise InputError(path, f"line {line}: {err.problem}") from None
    return np.asarray(canonical, dtype="<U2")[inverse]


def _parse_pdb(text: str, path: Path) -> Atoms:
    species_tokens, line_numbers, coords, occupancy, b_factor = [], [], [], [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        record = line[:6]
        if record in ("ENDMDL", "END   ", "END"):
            break  # first model only
        if record not in ("ATOM  ", "HETATM"):
            continue
        if len(line.rstrip()) < 54:
            raise InputError(path, f"line {lineno}: {record.strip()} record too short "
                                   f"({len(line.rstrip())} characters, coordinates need columns 31-54)")
        fields = [line[30:38], line[38:46], line[46:54]]
        try:
            coords.append([float(f) for f in fields])
        except ValueError:
            bad = next(f for f in fields if not _is_float(f))
            raise InputError(path, f"line {lineno}: coordinate {bad.strip()!r} is not a number") from None
        if not np.all(np.isfinite(coords[-1])):
            raise InputError(path, f"line {lineno}: non-finite position (NaN or inf)")
        occ, bf = line[54:60].strip(), line[60:66].strip()
        for value, name, sink, default in ((occ, "occupancy", occupancy, 1.0), (bf, "B-factor", b_factor, 0.0)):
            if value and not _is_float(value):
                raise InputError(path, f"line {lineno}: {name} {value!r} is not a number")
            sink.append(float(value) if value else default)
        # Element: columns 77-78; old files leave them blank and put it in the atom name (13-14).
        element = line[76:78].strip() or re.sub(r"[^A-Za-z]", "", line[12:14])
        species_tokens.append(element)
        line_numbers.append(lineno)
    if not coords:
        raise InputError(path, "empty structure (0 atoms)")
    species = _species_from_tokens(np.array(species_tokens, dtype=str), path, np.array(line_numbers))
    columns = {}
    if any(b != 0.0 for b in b_factor):
        columns["b_factor"] = np.asarray(b_factor)
    if any(o != 1.0 for o in occupancy):
        columns["occupancy"] = np.asarray(occupancy)
    return Atoms(species, np.asarray(coords), columns)


def _is_float(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------------------- writing

def write_atoms(atoms: Atoms, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """
    Write atoms to an extended XYZ or PDB file, chosen by extension, atomically.

    XYZ: always extended XYZ, `Properties=species:S:1:pos:R:3[:name:R:1 ...]` with one R:1 entry per
    column and `info` as further key=value pairs (quoted when needed; `Lattice` first). Positions
    are written with 10 decimals (round trip to 1e-10 Å), columns with 12 significant digits.
    PDB: HETATM records, element symbol right-justified in columns 77-78, positions with 3
    decimals (the PDB format's limit: a round trip loses up to 5e-4 Å; coordinates must lie in
    [-999.999, 9999.999] Å), occupancy from the 'occupancy' or 'species_prob' column (else 1.0),
    B-factor from 'b_factor' [Å²] (else 0), both with 2 decimals. Other columns and `info` are not
    stored in PDB.

    Parameters
    ----------
    atoms : Atoms
        Atoms to write; positions [Å].
    path : str or os.PathLike
        Target `.xyz`/`.extxyz` or `.pdb` file.
    overwrite : bool
        Replace an existing file. If False (default) an existing file is an error and is kept.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in XYZ_SUFFIXES + PDB_SUFFIXES:
        raise InputError(path, f"unknown extension {path.suffix!r} (known: {', '.join(XYZ_SUFFIXES + PDB_SUFFIXES)})")
    if path.exists() and not overwrite:
        raise InputError(path, "file exists; pass overwrite=True (--overwrite) to replace it")
    if not path.parent.is_dir():
        raise InputError(path, f"directory {str(path.parent)!r} does not exist")
    if len(atoms) == 0:
        raise InputError(path, "empty structure (0 atoms), nothing to write")
    if not np.all(np.isfinite(atoms.positions)):
        raise InputError(path, "non-finite position (NaN or inf), refusing to write")
    text = _format_pdb(atoms, path) if suffix in PDB_SUFFIXES else _format_xyz(atoms, path)

    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline="\n"))


_NEEDS_QUOTES = re.compile(r"""[\s="'\\{}]""")


def _quote(value: str) -> str:
    if value and not _NEEDS_QUOTES.search(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _format_xyz(atoms: Atoms, path: Path) -> str:
    for name in atoms.columns:
        if name in ("species", "pos") or not name or _NEEDS_QUOTES.search(name) or ":" in name:
            raise InputError(path, f"column name {name!r} cannot be written to extended XYZ")
    props = "species:S:1:pos:R:3" + "".join(f":{name}:R:1" for name in atoms.columns)
    header = {k: v for k, v in atoms.info.items() if k == "Lattice"}
    header["Properties"] = props
    for key, value in atoms.info.items():
        if key.lower() == "properties" or key == "Lattice":
            continue
        if not key or _NEEDS_QUOTES.search(key) or "\n" in value or "\r" in value:
            raise InputError(path, f"info entry {key!r} cannot be written to an extended XYZ header")
        header[key] = value
    comment = " ".join(f"{k}={_quote(v)}" for k, v in header.items())

    species = np.char.ljust(atoms.species.astype(str), 2)
    body = [np.char.add(species, " ")]
    for values, fmt in [(atoms.positions[:, k], " %16.10f") for k in range(3)] + \
                       [(col, " %19.12g") for col in atoms.columns.values()]:
        body.append(np.char.mod(fmt, values))
    lines = body[0]
    for part in body[1:]:
        lines = np.char.add(lines, part)
    return f"{len(atoms)}\n{comment}\n" + "\n".join(lines.tolist()) + "\n"


def _format_pdb(atoms: Atoms, path: Path) -> str:
    if np.any(atoms.positions < -999.999) or np.any(atoms.positions > 9999.999):
        raise InputError(path, "coordinates outside the PDB range [-999.999, 9999.999] Å; write .xyz instead")
    n = len(atoms)
    occupancy = atoms.columns.get("occupancy", atoms.columns.get("species_prob", np.ones(n)))
    b_factor = atoms.columns.get("b_factor", np.zeros(n))
    for name, values in (("occupancy", occupancy), ("b_factor", b_factor)):
        if not np.all(np.isfinite(values)) or np.any(values < -99.99) or np.any(values > 999.99):
            raise InputError(path, f"{name} values must be finite and within [-99.99, 999.99] for PDB")
    lines = ["REMARK   1 written by atomsplat; coordinates in Angstrom, rounded to 0.001"]
    for i, (sym, (x, y, z), occ, bf) in enumerate(zip(atoms.species, atoms.positions, occupancy, b_factor)):
        element = sym.upper()
        # serial wraps at 100000 (5 columns), as other PDB writers do for large structures
        lines.append(f"HETATM{(i + 1) % 100000:5d} {element:>2}   UNL A   1    "
                     f"{x:8.3f}{y:8.3f}{z:8.3f}{occ:6.2f}{bf:6.2f}          {element:>2}  ")
    lines.append("END")
    return "\n".join(lines) + "\n"
