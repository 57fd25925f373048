"""Atoms as a triangle mesh for Blender and web viewers: one icosphere per atom, coloured by element.

`export_mesh` writes binary glTF (.glb) or PLY (.ply) through trimesh; vertex colours carry the
species colours of `viewer.palette`, positions stay in Å.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh

from engine.io.atoms import Atoms
from engine.core.errors import InputError
from engine.core.files import make_folder, write_atomically

from .palette import atom_radii, species_colours

MESH_FORMATS = {".glb": "glb", ".ply": "ply"}
SPHERE_SUBDIVISIONS = 2
"""Icosphere refinement per atom: 2 gives 162 vertices and 320 faces, round enough up close."""


def sphere_template(subdivisions: int = SPHERE_SUBDIVISIONS) -> tuple[np.ndarray, np.ndarray]:
    """Unit icosphere: vertices (V, 3) and faces (F, 3)."""
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=1.0)
    return np.asarray(sphere.vertices), np.asarray(sphere.faces)


def atoms_to_mesh(atoms: Atoms, subdivisions: int = SPHERE_SUBDIVISIONS) -> trimesh.Trimesh:
    """One icosphere per atom (radius from `palette.atom_radii`, Å) with per-vertex RGBA colours of
    its element; N atoms give N·V vertices and N·F faces, atom i owning vertices [i·V, (i + 1)·V)."""
    vertices, faces = sphere_template(subdivisions)
    n, nv = len(atoms), len(vertices)
    radii = atom_radii(atoms.species, atoms.columns.get("width"))
    all_vertices = (vertices[None] * radii[:, None, None] + atoms.positions[:, None, :]).reshape(-1, 3)
    all_faces = (faces[None] + nv * np.arange(n)[:, None, None]).reshape(-1, 3)
    rgba = np.concatenate([np.rint(species_colours(atoms.species) * 255), np.full((n, 1), 255)], axis=1)
    colours = np.repeat(rgba.astype(np.uint8), nv, axis=0)
    return trimesh.Trimesh(all_vertices, all_faces, vertex_colors=colours, process=False)


def export_mesh(atoms: Atoms, path, overwrite: bool = False) -> Path:
    """Write ``atoms`` as a sphere mesh to ``path`` (.glb or .ply, chosen by the extension)."""
    path = Path(path)
    file_type = MESH_FORMATS.get(path.suffix.lower())
    if file_type is None:
        raise InputError(path, f"unknown mesh format {path.suffix!r} (use {' or '.join(MESH_FORMATS)})")
    if len(atoms) == 0:
        raise InputError(path, "no atoms to export")
    if path.exists() and not overwrite:
        raise InputError(path, "already exists; pass --overwrite to replace it")
    mesh = atoms_to_mesh(atoms)
    make_folder(path.parent, path)
    return write_atomically(path, lambda tmp: mesh.export(tmp, file_type=file_type))
