"""What one atom is worth to the fit's likelihood: for every atom (or candidate), walking its
footprint in every projection, the exact log-likelihood gain of having it against not, the Fisher
information of its parameters and the gradient of the log-likelihood with respect to them.

Atom i (position r, amplitude a in image units · Å², width σ Å) adds to pixel p of projection k

    c_kp = f_k · a · Σ_j w_j / (2π s_j²) · exp(−d²/2s_j²),   s_j² = σ² + Δ_j² + b²

(the `AtomProfile`'s weights w_j and extra variances Δ_j², the projector's blur b, a per-projection
factor f_k: an intensity scale, a unit conversion). Given the model m_kp (background and all atoms
but, in add mode, this one) and the data y_kp, with `with` = m (remove mode) or m + c (add mode) and
`without` = with − c:

    gain     Poisson:  Σ_kp y log(with / without) − c
             Gaussian: Σ_kp (2 (y − with) c + c²) / 2v_k          (v_k the noise variance)
    Fisher   Σ_k T_kᵀ [Σ_p W ∇c ∇cᵀ] T_k,  W = 1/with (Poisson) or 1/v_k (Gaussian)
    score    Σ_k T_kᵀ [Σ_p W (y − with) ∇c]

∇c the in-plane derivatives (u, v per Å; log a and log σ when the shape is free), T_k maps them to
the world frame (the first two rows of the rotation for the position). Parameters: the position
(3), or the position, log a and log σ (5) with ``free_shape``.

The footprints are the projector's own (`TiltSeriesProjector._footprint`, the widest component's,
with its truncation, geometry and blur) and the row profile is the projector's recurrence. One
thread per atom walks all projections (no atomics: safe on every backend). The cost is about one
forward projection of the atoms. The evidence rule of the counted fit (`engine.fit.evidence`) and
the per-atom uncertainties of every fit (`engine.fit.uncertainty`) both run this kernel.
"""

import math

import numpy as np
import taichi as ti

from engine.kernels.atommodel import AtomProfile

NOISE_MODELS = ("poisson", "gaussian")
POISSON_FLOOR = 1e-6  # counts: a model value below this is taken as this (log and 1/λ stay finite)


@ti.data_oriented
class LikelihoodGain:
    """Per-atom gain, Fisher information and score against data and a model held on the device.

    projector  : the `TiltSeriesProjector` whose geometry, blur, image size and float type are used.
    noise      : 'poisson' (data and model in counts) or 'gaussian' (noise variance per projection,
                 `set_noise_variance`).
    profile    : the atoms' `AtomProfile`; free_shape: also log a and log σ (5 parameters, else 3).
    capacity   : atoms per launch (more are done in chunks)."""

    def __init__(self, projector, noise: str = "poisson", profile: AtomProfile = AtomProfile(),
                 free_shape: bool = False, capacity: int = 4096):
        if noise not in NOISE_MODELS:
            raise ValueError(f"unknown noise model {noise!r} (known: {', '.join(NOISE_MODELS)})")
        self.projector, self.noise, self.profile = projector, noise, profile
        self.free_shape = bool(free_shape)
        self.n_params = 5 if free_shape else 3
        self.weights = tuple(float(w) for w in profile.weights)
        self.extras = tuple(float(v) for v in profile.extra_var)  # Å²
        self.widest_extra = max(self.extras)  # Å²: the footprint walked is the widest component's
        self.n_proj, self.height, self.width = projector.n_proj, projector.height, projector.width
        self.pixel_size = projector.pixel_size
        self.dtype, self.np_dtype = projector.dtype, projector.np_dtype
        self.capacity = int(capacity)
        shape = (self.n_proj, self.height, self.width)
        self.model = ti.field(self.dtype, shape)
        self.data = ti.field(self.dtype, shape)
        self.factor = ti.field(self.dtype, self.n_proj)
        self.inverse_variance = ti.field(self.dtype, self.n_proj)
        self.pos = ti.Vector.field(3, self.dtype, self.capacity)
        self.amp = ti.field(self.dtype, self.capacity)
        self.sigma = ti.field(self.dtype, self.capacity)
        self.gain = ti.field(self.dtype, self.capacity)
        self.fisher = ti.Matrix.field(self.n_params, self.n_params, self.dtype, self.capacity)
        self.score = ti.Vector.field(self.n_params, self.dtype, self.capacity)
        self.set_factor(np.ones(self.n_proj))
        self.set_noise_variance(np.ones(self.n_proj))

    def set_counts(self, data: np.ndarray) -> None:
        """The measured data y (n, H, W): counts (Poisson) or image units (Gaussian)."""
        self.data.from_numpy(np.ascontiguousarray(data, self.np_dtype))

    def set_model(self, expected: np.ndarray) -> None:
        """The model m (n, H, W) that gains are measured against, in the data's units."""
        self.model.from_numpy(np.ascontiguousarray(expected, self.np_dtype))

    def set_factor(self, factor) -> None:
        """f_k (n,): what an atom's rendering is multiplied by in projection k (default 1)."""
        self.factor.from_numpy(np.broadcast_to(np.asarray(factor, self.np_dtype), (self.n_proj,)).copy())

    def set_noise_variance(self, variance) -> None:
        """The Gaussian noise variance v_k (n,) per projection, in the data's units squared."""
        self.inverse_variance.from_numpy(1.0 / np.broadcast_to(np.asarray(variance, np.float64), (self.n_proj,))
                                         .astype(self.np_dtype))

    @ti.kernel
    def _run(self, proj: ti.template(), n: ti.i32, add: ti.i32):
        weights = ti.static(self.weights)
        extras = ti.static(self.extras)
        K = ti.static(len(weights))
        P = ti.static(self.n_params)
        ps = self.dtype(self.pixel_size)
        for i in range(n):
            p, a, sig = self.pos[i], self.amp[i], self.sigma[i]
            total = self.dtype(0.0)
            fisher = ti.Matrix.zero(self.dtype, P, P)
            score = ti.Vector.zero(self.dtype, P)
            for k in range(self.n_proj):
                widest = ti.sqrt(sig * sig + self.dtype(self.widest_extra))
                col, row, _, _, _, c_lo, c_hi, r_lo, r_hi = proj._footprint(k, p, widest)
                # Per component: s² (px²), 1/2s², the walk's step, peak value per pixel.
                s2 = ti.Vector([(sig * sig + self.dtype(extras[j]) + self.dtype(proj.blur_sigma ** 2)) / (ps * ps)
                                for j in ti.static(range(K))])
                inv2s2 = 0.5 / s2
                step = ti.exp(-2.0 * inv2s2)
                peak = ti.Vector([self.factor[k] * a * self.dtype(weights[j] / (2.0 * math.pi)) / (s2[j] * ps * ps)
                                  for j in ti.static(range(K))])
                m = ti.Matrix.zero(self.dtype, 4, 4)
                g = ti.Vector.zero(self.dtype, 4)
                ex0 = ti.Vector.zero(self.dtype, K)
                qx0 = ti.Vector.zero(self.dtype, K)
                for j in ti.static(range(K)):
                    e0, q0 = proj._walk_start(c_lo - col, inv2s2[j])
                    ex0[j] = e0
                    qx0[j] = q0
                for r in range(r_lo, r_hi + 1):
                    dy = r - row
                    ey = ti.exp(-dy * dy * inv2s2)
                    ex, qx = ex0, qx0
                    for c in range(c_lo, c_hi + 1):
                        dx = c - col
                        atom = self.dtype(0.0)
                        radial = self.dtype(0.0)  # Σ_j c_j / s_j²: ∂c/∂u = radial · dx
                        widening = self.dtype(0.0)  # Σ_j c_j (d²/2s_j⁴ − 1/s_j²) = ∂c/∂(s² px²)
                        for j in ti.static(range(K)):
                            cj = peak[j] * ey[j] * proj._gaussian(dx, inv2s2[j], ex[j])
                            ex[j] *= qx[j]
                            qx[j] *= step[j]
                            atom += cj
                            radial += cj / s2[j]
                            widening += cj * ((dx * dx + dy * dy) * inv2s2[j] - 1.0) / s2[j]
                        lam = self.model[k, r, c]
                        y = self.data[k, r, c]
                        with_atom = lam + atom if add else lam
                        residual = self.dtype(0.0)
                        weight = self.dtype(0.0)
                        if ti.static(self.noise == "poisson"):
                            with_atom = ti.max(with_atom, self.dtype(POISSON_FLOOR))
                            without = ti.max(with_atom - atom, self.dtype(POISSON_FLOOR))
                            total -= with_atom - without
                            if y > 0.0:
                                total += y * ti.log(with_atom / without)
                            weight = 1.0 / with_atom
                            residual = (y - with_atom) * weight
                        else:
                            weight = self.inverse_variance[k]
                            residual = (y - with_atom) * weight
                            total += (2.0 * (y - with_atom) + atom) * atom * 0.5 * weight
                        grad = ti.Vector([radial * dx / ps, radial * dy / ps, atom,
                                          widening * 2.0 * sig * sig / (ps * ps)])
                        if ti.static(P == 3):
                            grad[2] = 0.0
                            grad[3] = 0.0
                        m += weight * grad.outer_product(grad)
                        g += residual * grad
                # T_k: in-plane (u, v, log a, log σ) → the parameters.
                t = ti.Matrix.zero(self.dtype, P, 4)
                for d in ti.static(range(3)):
                    t[d, 0] = proj.rot[k][0, d]
                    t[d, 1] = proj.rot[k][1, d]
                if ti.static(P == 5):
                    t[3, 2] = 1.0
                    t[4, 3] = 1.0
                fisher += t @ m @ t.transpose()
                score += t @ g
            self.gain[i] = total
            self.fisher[i] = fisher
            self.score[i] = score

    def evaluate(self, positions, amplitudes, widths, add: bool = False):
        """(gain (N,) nats, Fisher (N, P, P), score (N, P)) of atoms at ``positions`` (N, 3) Å with
        amplitudes (N,) image units · Å² and widths σ (N,) Å against the last `set_model` (which
        holds them in remove mode, not in add mode). Parameters: x, y, z (Å) [, log a, log σ]."""
        positions = np.asarray(positions, np.float64).reshape(-1, 3)
        n = len(positions)
        amplitudes = np.broadcast_to(np.asarray(amplitudes, np.float64), (n,))
        widths = np.broadcast_to(np.asarray(widths, np.float64), (n,))
        out = ([], [], [])
        for start in range(0, n, self.capacity):
            stop = min(start + self.capacity, n)
            pad = self.capacity - (stop - start)
            self.pos.from_numpy(np.pad(positions[start:stop], ((0, pad), (0, 0))).astype(self.np_dtype))
            self.amp.from_numpy(np.pad(amplitudes[start:stop], (0, pad)).astype(self.np_dtype))
            self.sigma.from_numpy(np.pad(widths[start:stop], (0, pad), constant_values=1.0).astype(self.np_dtype))
            self._run(self.projector, stop - start, 1 if add else 0)
            for store, field in zip(out, (self.gain, self.fisher, self.score)):
                store.append(field.to_numpy()[:stop - start].astype(np.float64))
        if not out[0]:
            p = self.n_params
            return np.zeros(0), np.zeros((0, p, p)), np.zeros((0, p))
        return tuple(np.concatenate(store) for store in out)

    def run(self, positions, amplitude: float, width: float, add: bool):
        """`evaluate` of tied atoms: ``amplitude`` expected counts per projection (the integral over
        the image in pixels), footprint width ``width`` Å, all atoms alike."""
        return self.evaluate(positions, amplitude * self.pixel_size ** 2, width, add)
