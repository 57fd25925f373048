"""atomsplat engine: direct atomic structure identification from electron tomography tilt series.

Stages, each a package (lower ones never import higher ones):
core (errors, files, elements, geometry, backend, settings) → io (tilt series, atoms, figures) →
kernels (projector, voxel projector, loss, atom model, Adam, neighbour grid) → physics (profile,
forward model, simulator, structures, chemistry) → measure (data model, alignment) → fit (seeding,
strategy, trainer, calibration, reconstruction); classical (SIRT/FBP baseline) and evaluate
(metrics) stand beside the fit. The Python API is `engine.api` and
`engine.validation` (half-set validation), re-exported here.

Units throughout: lengths in Å, angles in degrees (radians only inside kernels), image values in
the data's own units (projected potential, V·Å, for simulated data).
"""

import os

# Taichi prints a banner to stdout when imported; stdout carries only a command's requested output.
os.environ.setdefault("ENABLE_TAICHI_HEADER_PRINT", "False")

__version__ = "0.1.0"
__all__ = ["load_series", "reconstruct", "simulate", "score", "validate", "ReconstructionResult", "ValidationResult"]


def __getattr__(name):  # the API on first use: importing a stage alone does not start Taichi's import
    if name in ("validate", "ValidationResult"):
        from engine import validation

        return getattr(validation, name)
    if name in __all__:
        from engine import api

        return getattr(api, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
