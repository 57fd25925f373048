"""The tilt geometry contract (shared/data/GEOMETRY.md, v1) and its generalisation.

Contract, in short: lengths in Å, angles in degrees; world frame right-handed with the origin at the
rotation centre; projection k rotates the specimen actively, r' = R_k r, and integrates along z'.
For a single-axis tilt series R_k = R_y(θ_k) (tilt axis +y, beam +z at 0°). Image P[k, row, col]:
col ↔ x', row ↔ y', pixel centres at x' = (col − (W−1)/2)·s, y' = (row − (H−1)/2)·s.

Generalisation: every projection has its own 3×3 rotation (dual-axis or arbitrary orientations),
an in-plane shift (Å, added to (x', y') after the rotation) and an in-plane tilt-axis direction
(unit vector in (x', y')) about which tilt-angle offsets act. Every other module asks this one;
nothing else re-derives the convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.core.errors import InputError


def rotation_about_y(theta_deg):
    """Active rotation(s) by θ (degrees) about +y: [[c, 0, s], [0, 1, 0], [−s, 0, c]]; shape (..., 3, 3)."""
    t = np.deg2rad(np.asarray(theta_deg, dtype=np.float64))
    c, s = np.cos(t), np.sin(t)
    zero, one = np.zeros_like(t), np.ones_like(t)
    return np.stack([np.stack([c, zero, s], -1), np.stack([zero, one, zero], -1),
                     np.stack([-s, zero, c], -1)], -2)


def rotation_about_z(phi_deg):
    """Active rotation(s) by φ (degrees) about +z; shape (..., 3, 3)."""
    t = np.deg2rad(np.asarray(phi_deg, dtype=np.float64))
    c, s = np.cos(t), np.sin(t)
    zero, one = np.zeros_like(t), np.ones_like(t)
    return np.stack([np.stack([c, -s, zero], -1), np.stack([s, c, zero], -1),
                     np.stack([zero, zero, one], -1)], -2)


def euler_zyz(alpha_deg: float, beta_deg: float, gamma_deg: float) -> np.ndarray:
    """Active rotation R_z(α) R_y(β) R_z(γ) (degrees), the ZYZ convention used to orient particles."""
    return rotation_about_z(alpha_deg) @ rotation_about_y(beta_deg) @ rotation_about_z(gamma_deg)


def tilt_rotation(theta_deg, axis_angle_deg: float = 0.0):
    """Rotation by θ about an in-plane tilt axis turned by φ from +y towards −x.

    R = R_z(φ) R_y(θ) R_z(−φ); φ = 0 gives the contract's R_y(θ).
    """
    rz = rotation_about_z(axis_angle_deg)
    return rz @ rotation_about_y(theta_deg) @ rz.T


def centre_index(n_pixels: int) -> float:
    """Fractional pixel index of the coordinate origin along an image axis of n pixels: (n − 1)/2.
    Kernels turn x' (Å) into a pixel index as x'/s + centre_index(n)."""
    return (n_pixels - 1) / 2.0


def pixel_centres(n_pixels: int, pixel_size: float) -> np.ndarray:
    """Coordinates (Å) of the n pixel centres along one image axis: (i − (n−1)/2)·s."""
    return (np.arange(n_pixels, dtype=np.float64) - centre_index(n_pixels)) * pixel_size


@dataclass
class TiltGeometry:
    """Orientation of every projection of a tilt series.

    rotations : (n, 3, 3) active rotations world → beam frame (x', y', z'); the beam runs along z'.
    shifts    : (n, 2) in-plane shifts (Å) added to (x', y') after rotating.
    tilt_axes : (n, 2) unit vectors in (x', y'): the axis about which a tilt-angle offset rotates.
    """

    rotations: np.ndarray
    shifts: np.ndarray
    tilt_axes: np.ndarray

    def __post_init__(self):
        self.rotations = np.asarray(self.rotations, dtype=np.float64)
        n = len(self.rotations)
        if self.rotations.shape != (n, 3, 3):
            raise InputError("geometry", f"rotations must have shape (n, 3, 3), got {self.rotations.shape}")
        self.shifts = np.zeros((n, 2)) if self.shifts is None else np.asarray(self.shifts, dtype=np.float64)
        self.tilt_axes = (np.tile([0.0, 1.0], (n, 1)) if self.tilt_axes is None
                          else np.asarray(self.tilt_axes, dtype=np.float64))
        for name in ("shifts", "tilt_axes"):
            if getattr(self, name).shape != (n, 2):
                raise InputError("geometry", f"{name} must have shape ({n}, 2), got {getattr(self, name).shape}")
        if not np.allclose(self.rotations @ np.swapaxes(self.rotations, 1, 2), np.eye(3), atol=1e-6):
            raise InputError("geometry", "rotations must be orthonormal 3x3 matrices")

    @classmethod
    def from_tilt_angles(cls, angles_deg, shifts=None, axis_angle_deg: float = 0.0) -> "TiltGeometry":
        """Single-axis series: R_k = tilt_rotation(θ_k, φ), tilt axis (−sin φ, cos φ) in the image."""
        angles = np.asarray(angles_deg, dtype=np.float64).reshape(-1)
        phi = np.deg2rad(axis_angle_deg)
        axes = np.tile([-np.sin(phi), np.cos(phi)], (len(angles), 1))
        return cls(tilt_rotation(angles, axis_angle_deg), shifts, axes)

    def __len__(self) -> int:
        return len(self.rotations)

    def subset(self, indices) -> "TiltGeometry":
        return TiltGeometry(self.rotations[indices], self.shifts[indices], self.tilt_axes[indices])

    def views(self, positions: np.ndarray, shape, pixel_size: float) -> np.ndarray:
        """(n, N) bool: whether projection k of images ``shape`` (H, W) px with ``pixel_size`` Å sees
        each position (N, 3) Å, i.e. projects it within the outermost pixel centres."""
        beam = self.to_beam_frame(positions)
        h, w = shape
        return ((np.abs(beam[..., 0]) <= centre_index(w) * pixel_size + 1e-9)
                & (np.abs(beam[..., 1]) <= centre_index(h) * pixel_size + 1e-9))

    def pixel_coordinates(self, positions: np.ndarray, shape, pixel_size: float) -> np.ndarray:
        """(n, N, 2) the (column, row) pixel coordinates of ``positions`` (N, 3) Å in every projection,
        for images ``shape`` (H, W) px of ``pixel_size`` Å: the kernels' x'/s + centre_index(n)."""
        beam = self.to_beam_frame(positions)
        return np.stack([beam[..., 0] / pixel_size + centre_index(shape[1]),
                         beam[..., 1] / pixel_size + centre_index(shape[0])], axis=-1)

    def to_beam_frame(self, positions: np.ndarray) -> np.ndarray:
        """World positions (N, 3) Å → (n, N, 3) beam-frame coordinates (x', y', z') incl. shifts."""
        rotated = np.einsum("kij,nj->kni", self.rotations, np.asarray(positions, dtype=np.float64))
        rotated[..., :2] += self.shifts[:, None, :]
        return rotated

    def kernel_arrays(self) -> dict[str, np.ndarray]:
        """Per-projection float32 arrays in the layout the Taichi kernels read."""
        return {"rotations": self.rotations.astype(np.float32), "shifts": self.shifts.astype(np.float32),
                "tilt_axes": self.tilt_axes.astype(np.float32)}
