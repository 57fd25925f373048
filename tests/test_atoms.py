"""Atom files through ASE: extended XYZ / plain XYZ / PDB / CIF / POSCAR / LAMMPS round trips, ase.Atoms
conversion, the shared data files, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ase
import ase.io
from ase.build import bulk
from ase.calculators.singlepoint import SinglePointCalculator

from engine.io.atoms import Atoms, read_atoms, write_atoms
from engine.core.errors import InputError

from conftest import SHARED_DATA as DATA


def _shared(name: str) -> Path:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


def _random_atoms(n=50, seed=0) -> Atoms:
    rng = np.random.default_rng(seed)
    species = rng.choice(["Au", "Pt", "C", "X"], size=n)
    return Atoms(species, rng.normal(scale=30.0, size=(n, 3)))


# ------------------------------------------------------------------------------------ round trips

def test_extxyz_round_trip_with_columns_and_info(tmp_path):
    atoms = _random_atoms()
    rng = np.random.default_rng(1)
    atoms.columns = {"amplitude": rng.random(50) * 1e4, "width": rng.random(50) * 0.3,
                     "b_factor": rng.random(50), "my_score": rng.normal(size=50) * 1e-7}
    atoms.info = {"dataset": "unit test", "Lattice": "70.0 0.0 0.0 0.0 70.0 0.0 0.0 0.0 70.0",
                  "note": 'say "hi"', "pbc": "F F F"}
    path = write_atoms(atoms, tmp_path / "a.xyz")
    header = path.read_text().splitlines()[1]
    assert header.startswith('Lattice="70.0 0.0') and \
        "Properties=species:S:1:pos:R:3:amplitude:R:1:width:R:1:b_factor:R:1:my_score:R:1" in header
    back = read_atoms(path)
    assert back.species.tolist() == atoms.species.tolist()
    assert np.abs(back.positions - atoms.positions).max() < 1e-8
    assert list(back.columns) == list(atoms.columns)
    for name, values in atoms.columns.items():  # ASE writes 8 decimals
        np.testing.assert_allclose(back.columns[name], values, rtol=0, atol=5e-9 + 1e-12)
    assert back.info == atoms.info
    again = read_atoms(write_atoms(back, tmp_path / "b.extxyz"))
    assert again.info == atoms.info and list(again.columns) == list(atoms.columns)


def test_plain_xyz_and_typed_properties(tmp_path):
    plain = tmp_path / "plain.xyz"
    plain.write_text("3\nhello world\nau 0 0 0\n78 1.5 -2 3e-1\nx 1 2 3\n")
    atoms = read_atoms(plain)
    assert atoms.species.tolist() == ["Au", "Pt", "X"]
    np.testing.assert_array_equal(atoms.positions[1], [1.5, -2.0, 0.3])
    assert atoms.info == {"comment": "hello world"} and atoms.columns == {}

    typed = tmp_path / "typed.extxyz"
    typed.write_text("2\nProperties=species:S:1:pos:R:3:tag:I:1:fixed:L:1:label:S:1:force:R:3 energy=-1.5\n"
                     "Ni 0 0 0 7 T a 0.1 0.2 0.3\nFe 1 1 1 -2 F b 0.4 0.5 0.6\n")
    atoms = read_atoms(typed)
    assert atoms.species.tolist() == ["Ni", "Fe"]
    assert sorted(atoms.columns) == ["fixed", "force_0", "force_1", "force_2", "tag"]
    np.testing.assert_array_equal(atoms.columns["tag"], [7, -2])
    np.testing.assert_array_equal(atoms.columns["fixed"], [1, 0])
    np.testing.assert_array_equal(atoms.columns["force_2"], [0.3, 0.6])
    assert atoms.info == {"energy": "-1.5"}


def test_pdb_round_trip_within_pdb_precision(tmp_path):
    atoms = _random_atoms()
    rng = np.random.default_rng(2)
    atoms.columns = {"b_factor": rng.random(50) * 5, "species_prob": rng.random(50)}
    path = write_atoms(atoms, tmp_path / "a.pdb")
    records = [line for line in path.read_text().splitlines() if line.startswith("ATOM  ")]
    assert len(records) == 50
    for line, symbol in zip(records, atoms.species):
        assert line[76:78] == f"{symbol.upper():>2}"  # element right-justified in columns 77-78
    back = read_atoms(path)
    assert back.species.tolist() == atoms.species.tolist()
    error = np.abs(back.positions - atoms.positions).max()
    assert 1e-5 < error <= 5e-4 + 1e-9  # 3 decimals: really rounded, and no worse than rounding
    np.testing.assert_allclose(back.columns["b_factor"], atoms.columns["b_factor"], atol=5e-3 + 1e-9)
    np.testing.assert_allclose(back.columns["occupancy"], atoms.columns["species_prob"], atol=5e-3 + 1e-9)


def test_pdb_reader_element_fallback_and_defaults(tmp_path):
    path = tmp_path / "old.pdb"
    path.write_text("HEADER    test\n"
                    "ATOM      1 AU   UNL A   1       1.000   2.000   3.000\n"
                    "HETATM    2 NI   UNL A   1      -1.000  -2.000  -3.000  1.00  0.00          NI  \n"
                    "ENDMDL\nATOM      3 AU   UNL A   1       9.000   9.000   9.000\n")
    atoms = read_atoms(path)
    assert atoms.species.tolist() == ["Au", "Ni"] and atoms.columns == {}
    np.testing.assert_array_equal(atoms.positions, [[1, 2, 3], [-1, -2, -3]])


def test_xyz_first_frame_of_a_trajectory(tmp_path):
    path = tmp_path / "traj.xyz"
    path.write_text("2\nframe=0\nAu 0 0 0\nPt 1 1 1\n1\nframe=1\nNi 5 5 5\n")
    atoms = read_atoms(path)
    assert atoms.species.tolist() == ["Au", "Pt"] and atoms.info == {"frame": "0"}


@pytest.mark.parametrize("name", ["bulk.cif", "POSCAR", "CONTCAR", "bulk.vasp", "bulk.xsf", "bulk.traj"])
def test_reads_files_written_by_ase(tmp_path, name):
    crystal = bulk("Cu", "fcc", a=3.61, cubic=True) * (2, 1, 1)
    crystal.positions += 0.1  # off the cell corner
    ase.io.write(tmp_path / name, crystal)
    atoms = read_atoms(tmp_path / name)
    assert atoms.species.tolist() == crystal.get_chemical_symbols()
    np.testing.assert_allclose(atoms.positions, crystal.positions, atol=1e-6)
    np.testing.assert_allclose(np.array(atoms.info["Lattice"].split(), float).reshape(3, 3), crystal.cell, atol=1e-6)
    assert atoms.info["pbc"] == "T T T"


@pytest.mark.parametrize("name", ["bulk.cif", "POSCAR", "bulk.vasp", "bulk.lmp"])
def test_writes_periodic_formats_by_name(tmp_path, name):
    atoms = Atoms(["Au", "Ni", "X"], [[0.5, 0.5, 0.5], [2.0, 2.0, 0.5], [0.5, 2.0, 2.0]],
                  {"amplitude": [1.0, 2.0, 3.0]}, {"Lattice": "4.0 0.0 0.0 0.0 4.0 0.0 0.0 0.0 4.0"})
    back = read_atoms(write_atoms(atoms, tmp_path / name))
    assert back.species.tolist() == ["Au", "Ni", "X"]  # LAMMPS data too: written with masses
    np.testing.assert_allclose(back.positions, atoms.positions, atol=1e-6)
    assert back.info["Lattice"] == "4.0 0.0 0.0 0.0 4.0 0.0 0.0 0.0 4.0" and back.info["pbc"] == "T T T"


def test_lammps_data_without_masses_has_unknown_species(tmp_path):
    path = tmp_path / "types.lmp"
    ase.io.write(path, bulk("Cu", "fcc", a=3.61, cubic=True), format="lammps-data")  # no Masses section
    atoms = read_atoms(path)
    assert len(atoms) == 4 and set(atoms.species) == {"X"}
    np.testing.assert_array_equal(atoms.columns["type"], 1.0)


def test_to_ase_and_from_ase_round_trip():
    atoms = _random_atoms(20)
    atoms.columns = {"amplitude": np.arange(20.0), "width": np.linspace(0.3, 0.5, 20)}
    atoms.info = {"dataset": "unit test", "Lattice": "70.0 0.0 0.0 0.0 60.0 0.0 0.0 0.0 50.0", "pbc": "F F F"}
    converted = atoms.to_ase()
    assert isinstance(converted, ase.Atoms) and converted.get_chemical_symbols() == atoms.species.tolist()
    assert np.all(converted.numbers[atoms.species == "X"] == 0)  # ASE's dummy atom
    np.testing.assert_array_equal(converted.positions, atoms.positions)
    np.testing.assert_array_equal(converted.arrays["width"], atoms.columns["width"])
    np.testing.assert_array_equal(converted.cell.lengths(), [70.0, 60.0, 50.0])
    assert not converted.pbc.any() and converted.info == {"dataset": "unit test"}
    back = Atoms.from_ase(converted)
    assert back.species.tolist() == atoms.species.tolist() and back.info == atoms.info
    np.testing.assert_array_equal(back.positions, atoms.positions)
    assert back.columns.keys() == atoms.columns.keys()
    for name, values in atoms.columns.items():
        np.testing.assert_array_equal(back.columns[name], values)
    converted.positions[0] = 99.0  # copies, not views
    assert atoms.positions[0, 0] != 99.0
    assert "pbc" not in Atoms.from_ase(Atoms(["Au"], [[0.0, 0.0, 0.0]], info={"pbc": "F F F"}).to_ase()).info
    with pytest.raises(ValueError, match="clashes"):
        Atoms(["Au"], [[0.0, 0.0, 0.0]], {"numbers": [1.0]}).to_ase()


def test_from_ase_arrays_calculator_and_extxyz_written_by_ase(tmp_path):
    crystal = bulk("Pt", "fcc", a=3.92, cubic=True)
    crystal.set_tags([1, 2, 3, 4])
    crystal.set_momenta(np.arange(12.0).reshape(4, 3))
    crystal.calc = SinglePointCalculator(crystal, energy=-1.5, forces=np.ones((4, 3)))
    atoms = Atoms.from_ase(crystal)
    assert sorted(atoms.columns) == ["forces_0", "forces_1", "forces_2", "momenta_0", "momenta_1", "momenta_2", "tags"]
    np.testing.assert_array_equal(atoms.columns["momenta_1"], [1.0, 4.0, 7.0, 10.0])
    assert atoms.info["energy"] == "-1.5" and atoms.info["pbc"] == "T T T"
    ase.io.write(tmp_path / "pt.xyz", crystal)  # extended XYZ with ASE's own extras
    back = read_atoms(tmp_path / "pt.xyz")
    assert back.species.tolist() == ["Pt"] * 4 and back.info["energy"] == "-1.5"
    np.testing.assert_array_equal(back.columns["forces_2"], 1.0)
    np.testing.assert_array_equal(back.columns["tags"], [1, 2, 3, 4])


def test_atoms_methods():
    atoms = _random_atoms(10)
    atoms.columns = {"width": np.arange(10.0)}
    sub = atoms.subset([3, 1])
    assert sub.species.tolist() == [atoms.species[3], atoms.species[1]]
    np.testing.assert_array_equal(sub.columns["width"], [3.0, 1.0])
    assert len(atoms.subset(atoms.columns["width"] > 6.5)) == 3
    centred = atoms.centered()
    np.testing.assert_allclose(centred.positions.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(centred.positions - atoms.positions,
                               np.broadcast_to(-atoms.positions.mean(axis=0), (10, 3)))
    copy = atoms.copy()
    copy.positions[0] = 99.0
    copy.columns["width"][0] = -1.0
    assert atoms.positions[0, 0] != 99.0 and atoms.columns["width"][0] == 0.0
    alloy = Atoms(["X"] * 2, np.zeros((2, 3)))
    alloy.species[0] = "Pt"  # a 1-character dtype would silently truncate this to 'P'
    assert alloy.species[0] == "Pt"
    with pytest.raises(ValueError):
        Atoms(["Au"], np.zeros((2, 3)))


# ------------------------------------------------------------------------------------ shared data

def test_reads_shared_truth_files():
    au = read_atoms(_shared("dev_au_cubo_small_truth.xyz"))
    assert len(au) == 147 and set(au.species) == {"Au"}
    np.testing.assert_allclose(au.positions[0], [5.16911737, -5.63552998, -4.05337235])
    assert au.info["dataset"] == "dev_au_cubo_small" and au.info["pbc"] == "F F F"
    np.testing.assert_allclose(au.positions.mean(axis=0), 0.0, atol=1e-6)  # origin = centroid
    ptni = read_atoms(_shared("dev_ptni_wedge_truth.xyz"))
    species, counts = np.unique(ptni.species, return_counts=True)
    assert dict(zip(species.tolist(), counts.tolist())) == {"Ni": 162, "Pt": 243}


def test_reads_au_np(tmp_path):
    atoms = read_atoms(_shared("Au_NP.xyz"))
    assert len(atoms) == 6679 and set(atoms.species) == {"Au"}
    assert atoms.info["Lattice"] == "70.0 0.0 0.0 0.0 70.0 0.0 0.0 0.0 70.0"
    np.testing.assert_allclose(atoms.positions[1], [6.30067453, 32.62223316, 38.25839792])
    assert np.all((atoms.positions > 0) & (atoms.positions < 70))
    back = read_atoms(write_atoms(atoms, tmp_path / "np.xyz"))
    assert back.info == atoms.info and np.abs(back.positions - atoms.positions).max() < 1e-8


# ------------------------------------------------------------------------------------ bad input

BAD_FILES = [
    ("count.xyz", "abc\n\nAu 0 0 0\n", "line 1: atom count 'abc' is not an integer"),
    ("few.xyz", "3\ncomment\nAu 0 0 0\nAu 1 1 1\n", "expected 3 atom lines after the comment line, found 2"),
    ("fields.xyz", "2\n\nAu 0 0 0\nAu 1 1\n", "line 4: expected 4 fields (species:S:1:pos:R:3), found 3"),
    ("extfields.xyz", "1\nProperties=species:S:1:pos:R:3:amplitude:R:1\nAu 0 0 0\n", "line 3: expected 5 fields"),
    ("more.xyz", "2\n\nAu 0 0 0\nAu 1 1 1 1\n", "line 4: expected 4 fields (species:S:1:pos:R:3), found 5"),
    ("extra.xyz", "2\n\nAu 0 0 0\nAu 1 1 1\nAu 2 2 2\n", "line 5: more atom lines than the 2 of the count line"),
    ("coord.xyz", "2\n\nAu 0 0 0\nAu 1 one 1\n", "could not convert string to float: 'one'"),
    ("int.xyz", "1\nProperties=species:S:1:pos:R:3:tag:I:1\nAu 0 0 0 1.5\n", "invalid literal for int()"),
    ("nan.xyz", "2\n\nAu 0 0 0\nAu 1 nan 1\n", "line 4: non-finite position"),
    ("inf.xyz", "1\n\nAu inf 0 0\n", "line 3: non-finite position"),
    ("element.xyz", "2\n\nAu 0 0 0\nQq 1 1 1\n", "line 4: unknown element symbol 'Qq'"),
    ("zero.xyz", "0\n\n", "empty structure (0 atoms)"),
    ("blank.xyz", "", "empty structure (0 atoms)"),
    ("props.xyz", "1\nProperties=species:S:1:pos:R\nAu 0 0 0\n", "not a list of name:type:count triples"),
    ("nopos.xyz", "1\nProperties=species:S:1:x:R:3\nAu 0 0 0\n", "Properties needs pos:R:3"),
    ("type.xyz", "1\nProperties=species:S:1:pos:Q:3\nAu 0 0 0\n", "Unknown property type: Q"),
    ("lattice.xyz", '1\nLattice="1 2 3"\nAu 0 0 0\n', "line 2: Got info item Lattice"),
    ("coord.pdb", "HETATM    1 AU   UNL A   1       1.000   x.000   3.000  1.00  0.00          AU\n",
     "cannot read it as Protein Data Bank: Invalid or missing coordinate(s)"),
    ("short.pdb", "REMARK\nATOM      1 AU   UNL A   1       1.000   2.000\n", "Invalid or missing coordinate(s)"),
    ("element.pdb", "HETATM    1 QQ   UNL A   1       1.000   2.000   3.000  1.00  0.00          QQ\n",
     "Could not parse species from label QQ"),
    ("es.pdb", "HETATM    1 ES   UNL A   1       1.000   2.000   3.000  1.00  0.00          ES\n",
     "atom 1: unknown element symbol 'Es'"),
    ("nan.pdb", "HETATM    1 AU   UNL A   1       1.000     nan   3.000  1.00  0.00          AU\n",
     "atom 1: non-finite position"),
    ("empty.pdb", "HEADER    nothing\nEND\n", "empty structure (0 atoms)"),
    ("atoms.cif", "data_x\n", "cannot read it as CIF-file: unexpected end of file"),
    ("POSCAR", "garbage\n", "cannot read it as VASP POSCAR/CONTCAR"),
    ("atoms.foo", "1\n\nAu 0 0 0\n", "unknown file type '.foo'"),
]


@pytest.mark.parametrize("name, content, problem", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_files_name_file_and_problem(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError) as err:
        read_atoms(path)
    assert err.value.source == str(path)
    assert str(err.value).startswith(f"{path}: ") and problem in str(err.value)


@pytest.mark.parametrize("make, problem", [
    (lambda p: None, "file not found"),
    (lambda p: p.mkdir(), "cannot read the file"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), "not a text file"),
], ids=["missing", "directory", "binary"])
def test_unreadable_files(tmp_path, make, problem):
    path = tmp_path / "atoms.xyz"
    make(path)
    with pytest.raises(InputError) as err:
        read_atoms(path)
    assert err.value.source == str(path) and problem in err.value.problem


def test_write_refuses_overwrite_and_keeps_original(tmp_path):
    first, second = _random_atoms(5, seed=1), _random_atoms(7, seed=2)
    path = write_atoms(first, tmp_path / "a.xyz")
    original = path.read_text()
    with pytest.raises(InputError) as err:
        write_atoms(second, path)
    assert err.value.source == str(path) and "overwrite=True" in err.value.problem
    assert path.read_text() == original
    write_atoms(second, path, overwrite=True)
    assert len(read_atoms(path)) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.xyz"]  # no temp file left behind


@pytest.mark.parametrize("name, atoms, problem", [
    ("a.foo", _random_atoms(3), "unknown file type '.foo'"),
    ("POSCAR", _random_atoms(3), "no cell given"),
    ("a.xyz", Atoms(["Au"], [[0.0, 0.0, 0.0]], {"my score": [1.0]}), "column name 'my score' cannot be written"),
    ("a.xyz", Atoms(["Au"], [[0.0, 0.0, 0.0]], {"pos": [1.0]}), "column name 'pos' cannot be written"),
    ("a.xyz", Atoms(["Au"], [[0.0, 0.0, 0.0]], info={"note": "two\nlines"}), "info entry 'note' cannot be written"),
    ("a.xyz", Atoms(["Au"], [[0.0, 0.0, 0.0]], info={"Lattice": "1 2 3"}), "'Lattice' must be nine numbers"),
    ("a.pdb", Atoms(np.array([], dtype=str), np.zeros((0, 3))), "empty structure (0 atoms)"),
    ("a.xyz", Atoms(["Au"], [[0.0, np.nan, 0.0]]), "non-finite position"),
    ("a.pdb", Atoms(["Au"], [[0.0, -1000.0, 0.0]]), "outside the PDB range"),
    ("missing_dir/a.xyz", _random_atoms(3), "does not exist"),
])
def test_write_errors(tmp_path, name, atoms, problem):
    with pytest.raises(InputError) as err:
        write_atoms(atoms, tmp_path / name)
    assert err.value.source == str(tmp_path / name) and problem in err.value.problem
    assert not (tmp_path / name).exists()


def test_an_empty_result_is_a_zero_atom_xyz(tmp_path):
    """A fit that finds no atom writes an XYZ of 0 atoms (its answer), with the columns declared."""
    write_atoms(Atoms(np.array([], dtype=str), np.zeros((0, 3)), {"amplitude": np.zeros(0)}), tmp_path / "a.xyz")
    lines = (tmp_path / "a.xyz").read_text().splitlines()
    assert lines[0].strip() == "0" and "amplitude" in lines[1]
