"""What one atom is worth to a Poisson likelihood: for every atom (or candidate), walking its
footprint in every projection, the exact log-likelihood gain of having it against not, the Fisher
information of its position and the gradient of the log-likelihood with respect to it.

Atom i with amplitude A (expected counts per projection) and footprint width s (Å; atom and blur)
adds c_kp = A / (2π s_px²) · exp(−d²/2s_px²) expected counts to pixel p of projection k. Given the
model λ_kp (background and atoms) and the counts y_kp:

    remove mode (the atom is in λ):       gain = Σ_kp y log(λ / (λ − c)) − c
    add mode    (the candidate is not):   gain = Σ_kp y log((λ + c) / λ) − c
    Fisher (per Å²)  = Σ_k R_kᵀ [Σ_p ∇c ∇cᵀ / λ_with] R_k     (R_k: the first two rows of the rotation)
    score (per Å)    = Σ_k R_kᵀ [Σ_p (y / λ_with − 1) ∇c]

One thread per atom walks all projections (no atomics: safe on every backend); the row profile is
a recurrence as in the projector. The cost is about one forward projection of the atoms.
"""

import math

import numpy as np
import taichi as ti

from engine.core.geometry import centre_index
from engine.kernels.projector import TRUNCATION_RADIUS_SIGMAS


@ti.data_oriented
class LikelihoodGain:
    """geometry: the projections' `TiltGeometry`; shape (H, W) px; pixel_size Å; capacity: atoms per
    launch (more are done in chunks)."""

    def __init__(self, geometry, shape, pixel_size: float, capacity: int = 4096):
        self.n_proj = len(geometry)
        self.height, self.width = (int(v) for v in shape)
        self.pixel_size = float(pixel_size)
        self.capacity = int(capacity)
        self.rot = ti.Matrix.field(3, 3, ti.f32, self.n_proj)
        self.shift = ti.Vector.field(2, ti.f32, self.n_proj)
        self.model = ti.field(ti.f32, (self.n_proj, self.height, self.width))
        self.counts = ti.field(ti.f32, (self.n_proj, self.height, self.width))
        self.pos = ti.Vector.field(3, ti.f32, self.capacity)
        self.gain = ti.field(ti.f32, self.capacity)
        self.fisher = ti.Matrix.field(3, 3, ti.f32, self.capacity)
        self.score = ti.Vector.field(3, ti.f32, self.capacity)
        self.set_geometry(geometry)

    def set_geometry(self, geometry) -> None:
        arrays = geometry.kernel_arrays()
        self.rot.from_numpy(arrays["rotations"])
        self.shift.from_numpy(arrays["shifts"])

    def set_counts(self, counts: np.ndarray) -> None:
        """The measured counts y (n, H, W)."""
        self.counts.from_numpy(np.ascontiguousarray(counts, np.float32))

    def set_model(self, expected: np.ndarray) -> None:
        """The model's expected counts λ (n, H, W) that gains are measured against."""
        self.model.from_numpy(np.ascontiguousarray(expected, np.float32))

    @ti.kernel
    def _run(self, n: ti.i32, amp: ti.f32, s_px: ti.f32, add: ti.i32):
        ps = ti.static(self.pixel_size)
        for i in range(n):
            total = 0.0
            fisher = ti.Matrix.zero(ti.f32, 3, 3)
            score = ti.Vector.zero(ti.f32, 3)
            s2 = s_px * s_px
            norm = amp / (2.0 * math.pi * s2)
            radius = ti.static(TRUNCATION_RADIUS_SIGMAS) * s_px
            for k in range(self.n_proj):
                q = self.rot[k] @ self.pos[i]
                col = (q[0] + self.shift[k][0]) / ps + ti.static(centre_index(self.width))
                row = (q[1] + self.shift[k][1]) / ps + ti.static(centre_index(self.height))
                c_lo = ti.max(ti.cast(ti.ceil(col - radius), ti.i32), 0)
                c_hi = ti.min(ti.cast(ti.floor(col + radius), ti.i32), self.width - 1)
                r_lo = ti.max(ti.cast(ti.ceil(row - radius), ti.i32), 0)
                r_hi = ti.min(ti.cast(ti.floor(row + radius), ti.i32), self.height - 1)
                fuu, fuv, fvv, gu, gv = 0.0, 0.0, 0.0, 0.0, 0.0
                step = ti.exp(-1.0 / s2)
                ex0 = ti.exp(-0.5 * (c_lo - col) * (c_lo - col) / s2)
                qx0 = ti.exp(-(2.0 * (c_lo - col) + 1.0) * 0.5 / s2)
                for r in range(r_lo, r_hi + 1):
                    dy = r - row
                    ey = norm * ti.exp(-0.5 * dy * dy / s2)
                    ex, qx = ex0, qx0
                    for c in range(c_lo, c_hi + 1):
                        dx = c - col
                        atom = ey * ex
                        ex *= qx
                        qx *= step
                        lam = self.model[k, r, c]
                        y = self.counts[k, r, c]
                        with_atom, without = lam + atom, lam
                        if add == 0:
                            with_atom, without = lam, ti.max(lam - atom, 1e-6)
                        total -= with_atom - without
                        if y > 0.0:
                            total += y * ti.log(with_atom / without)
                        du = atom * dx / (s2 * ps)  # dc/du per Å, u the in-plane coordinate
                        dv = atom * dy / (s2 * ps)
                        w = 1.0 / with_atom
                        fuu += du * du * w
                        fuv += du * dv * w
                        fvv += dv * dv * w
                        residual = y * w - 1.0
                        gu += residual * du
                        gv += residual * dv
                r0 = ti.Vector([self.rot[k][0, 0], self.rot[k][0, 1], self.rot[k][0, 2]])
                r1 = ti.Vector([self.rot[k][1, 0], self.rot[k][1, 1], self.rot[k][1, 2]])
                fisher += (fuu * r0.outer_product(r0) + fuv * (r0.outer_product(r1) + r1.outer_product(r0))
                           + fvv * r1.outer_product(r1))
                score += gu * r0 + gv * r1
            self.gain[i] = total
            self.fisher[i] = fisher
            self.score[i] = score

    def run(self, positions, amplitude: float, width: float, add: bool):
        """(gain (N,), Fisher (N, 3, 3) per Å², score (N, 3) per Å) of atoms at ``positions`` (N, 3)
        Å with ``amplitude`` counts per projection and footprint width ``width`` Å, against the model
        of the last `set_model` (which holds them in remove mode, not in add mode)."""
        positions = np.asarray(positions, np.float32).reshape(-1, 3)
        out = ([], [], [])
        for start in range(0, len(positions), self.capacity):
            chunk = positions[start:start + self.capacity]
            buffer = np.zeros((self.capacity, 3), np.float32)
            buffer[:len(chunk)] = chunk
            self.pos.from_numpy(buffer)
            self._run(len(chunk), float(amplitude), float(width / self.pixel_size), 0 if not add else 1)
            for store, field in zip(out, (self.gain, self.fisher, self.score)):
                store.append(field.to_numpy()[:len(chunk)].astype(np.float64))
        if not out[0]:
            return np.zeros(0), np.zeros((0, 3, 3)), np.zeros((0, 3))
        return tuple(np.concatenate(store) for store in out)
