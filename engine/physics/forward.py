"""The one forward model: atoms → predicted projections, in data units.

    image_k = c_k · Σ_atoms Σ_j w_j a G(σ² + Δ_j² + b²; π_k(p)) + b_k · scale + background

a (data units · Å²), σ (Å) and p (Å) per atom; the atom profile's weights w_j and extra variances
Δ_j² (`engine.physics.profile`); the blur b (Å); the geometry π_k (rotation, shift; `TiltGeometry`);
per-projection intensity scale c_k and offset b_k (normalised units, × ``scale`` for data units).

The fit renders this on the device; its outputs, the viewer (`atomsplat view --data`) and the
simulator render it through `ForwardModel`, and a fit saves its parameters (`as_dict`) in
report.json so a saved result is predicted exactly as the fit predicted it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.core.geometry import TiltGeometry
from engine.kernels.projector import project_tilt_series
from engine.physics.profile import AtomProfile


@dataclass
class ForwardModel:
    """geometry: the projections' `TiltGeometry`; shape (H, W) px; pixel_size Å; blur σ Å;
    profile: the atoms' `AtomProfile`; background and scale in data units; intensity_scale and
    intensity_offset (n,) as fitted (None: 1 and 0)."""

    geometry: TiltGeometry
    shape: tuple
    pixel_size: float
    blur: float = 0.0
    profile: AtomProfile = field(default_factory=AtomProfile)
    background: float = 0.0
    scale: float = 1.0
    intensity_scale: np.ndarray | None = None
    intensity_offset: np.ndarray | None = None

    def render_gaussians(self, positions, amplitudes, widths, indices=None) -> np.ndarray:
        """Projections ``indices`` (default all) of plain Gaussians (positions (N, 3) Å, amplitudes
        (N,), widths σ (N,) Å) in the geometry with the blur, before intensities and background."""
        return project_tilt_series(positions, amplitudes, widths, self.geometry, self.shape, self.pixel_size,
                                   self.blur, indices=indices)

    def predict(self, positions, amplitudes, widths, indices=None) -> np.ndarray:
        """Predicted projections ``indices`` (default all), data units, of atoms with these positions
        (N, 3) Å, amplitudes (N,) data units · Å² and widths σ (N,) Å."""
        n = len(self.geometry)
        indices = np.arange(n) if indices is None else np.asarray(indices).reshape(-1)
        positions = np.asarray(positions, np.float64).reshape(-1, 3)
        weights, sigmas = self.profile.gaussians(amplitudes, widths)  # (N, K) each
        k = weights.shape[-1]
        images = self.render_gaussians(np.tile(positions, (k, 1)), weights.T.ravel(), sigmas.T.ravel(), indices)
        c = np.ones(n) if self.intensity_scale is None else np.asarray(self.intensity_scale)
        b = np.zeros(n) if self.intensity_offset is None else np.asarray(self.intensity_offset)
        return (images * c[indices, None, None] + b[indices, None, None] * self.scale + self.background)

    def as_dict(self) -> dict:
        """What report.json keeps (the geometry goes to alignment.json when it was refined)."""
        values = {"blur_A": self.blur, "background": self.background, "scale": self.scale,
                  "profile": {"weights": list(self.profile.weights), "extra_var_A2": list(self.profile.extra_var)}}
        if self.intensity_offset is not None:  # the fitted background of each projection, above `background`
            values["background_offsets"] = (np.asarray(self.intensity_offset) * self.scale).tolist()
        return values

    @classmethod
    def from_dict(cls, values: dict, geometry: TiltGeometry, shape, pixel_size: float) -> "ForwardModel":
        """The model `as_dict` saved, in ``geometry``."""
        profile = values["profile"]
        offsets = values.get("background_offsets")
        scale = float(values["scale"])
        return cls(geometry, tuple(shape), pixel_size, float(values["blur_A"]),
                   AtomProfile(tuple(profile["weights"]), tuple(profile["extra_var_A2"])),
                   float(values["background"]), scale, None,
                   None if offsets is None else np.asarray(offsets, np.float64) / scale)

    def aligned(self, alignment, angles_deg) -> "ForwardModel":
        """This model in a refined `engine.measure.alignment.Alignment` of the nominal tilt angles
        ``angles_deg``: its geometry, intensity scales and offsets."""
        return ForwardModel(alignment.geometry(angles_deg), self.shape, self.pixel_size, self.blur, self.profile,
                            self.background, self.scale, alignment.intensity_scale, alignment.intensity_offset)
