"""atomsplat engine: tilt-series I/O, tilt geometry, the differentiable Gaussian projector,
the physics simulator and the reconstruction pipeline.

Units throughout: lengths in Å, angles in degrees (radians only inside kernels), image values in
the data's own units (projected potential, V·Å, for simulated data).
"""

__version__ = "0.1.0"
