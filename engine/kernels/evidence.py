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
thread per (atom, projection) pair writes that pair's gain and in-plane moments (no atomics: safe on
every backend); the host maps them to the world frame and sums them. The cost is about one forward
projection of the atoms. The evidence rule of the counted fit (`engine.fit.evidence`) and
the per-atom uncertainties of every fit (`engine.fit.uncertainty`) both run this kernel.
"""

import math

import numpy as np
import taichi as ti

from engine.core.backend import session_cache
from engine.kernels.atommodel import AtomProfile

NOISE_MODELS = ("poisson", "gaussian")
MOMENTS = 15  # per (atom, projection): Σ W ∇c ∇cᵀ (10), Σ W (y − with) ∇c (4), the gain
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
                 free_shape: bool = False, capacity: int = 512):
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
        self.moments = ti.Vector.field(MOMENTS, self.dtype, (self.capacity, self.n_proj))
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
        """Per (atom, projection) pair: the gain, and the in-plane moments Σ_p W ∇c ∇cᵀ (10 distinct)
        and Σ_p W (y − with) ∇c (4), ∇c = (∂u, ∂v per Å, ∂log a, ∂log σ); `evaluate` maps them to
        the world frame. One thread per pair, each writing its own slot."""
        weights = ti.static(self.weights)
        extras = ti.static(self.extras)
        K = ti.static(len(weights))
        ps = self.dtype(self.pixel_size)
        for i, k in ti.ndrange(n, self.n_proj):
            p, a, sig = self.pos[i], self.amp[i], self.sigma[i]
            total = self.dtype(0.0)
            widest = ti.sqrt(sig * sig + self.dtype(self.widest_extra))
            col, row, _, _, _, c_lo, c_hi, r_lo, r_hi = proj._footprint(k, p, widest)
            # Per component: s² (px²), 1/2s², the walk's step, peak value per pixel.
            s2 = ti.Vector([(sig * sig + self.dtype(extras[j]) + self.dtype(proj.blur_sigma ** 2)) / (ps * ps)
                            for j in ti.static(range(K))])
            inv2s2 = 0.5 / s2
            step = ti.exp(-2.0 * inv2s2)
            peak = ti.Vector([self.factor[k] * a * self.dtype(weights[j] / (2.0 * math.pi)) / (s2[j] * ps * ps)
                              for j in ti.static(range(K))])
            out = ti.Vector.zero(self.dtype, MOMENTS)
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
                    widening = self.dtype(0.0)  # Σ_j c_j (d²/2s_j⁴ − 1/s_j²) = ∂c/∂(s² in px²)
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
                    weight = self.dtype(0.0)
                    if ti.static(self.noise == "poisson"):
                        with_atom = ti.max(with_atom, self.dtype(POISSON_FLOOR))
                        without = ti.max(with_atom - atom, self.dtype(POISSON_FLOOR))
                        total -= with_atom - without
                        if y > 0.0:
                            total += y * ti.log(with_atom / without)
                        weight = 1.0 / with_atom
                    else:
                        weight = self.inverse_variance[k]
                        total += (2.0 * (y - with_atom) + atom) * atom * 0.5 * weight
                    g = ti.Vector([radial * dx / ps, radial * dy / ps, atom, widening * 2.0 * sig * sig / (ps * ps)])
                    wg = weight * g
                    out += ti.Vector([wg[0] * g[0], wg[0] * g[1], wg[0] * g[2], wg[0] * g[3], wg[1] * g[1],
                                      wg[1] * g[2], wg[1] * g[3], wg[2] * g[2], wg[2] * g[3], wg[3] * g[3],
                                      (y - with_atom) * wg[0], (y - with_atom) * wg[1],
                                      (y - with_atom) * wg[2], (y - with_atom) * wg[3], 0.0])
            out[MOMENTS - 1] = total
            self.moments[i, k] = out

    def _world_frame(self) -> np.ndarray:
        """T_k (n, P, 4): in-plane (u, v, log a, log σ) derivatives → the parameters, for the
        projector's current geometry."""
        rot = self.projector.rot.to_numpy().astype(np.float64)
        t = np.zeros((self.n_proj, self.n_params, 4))
        t[:, :3, :2] = rot[:, :2, :].transpose(0, 2, 1)
        if self.free_shape:
            t[:, 3, 2] = t[:, 4, 3] = 1.0
        return t

    def evaluate(self, positions, amplitudes, widths, add: bool = False):
        """(gain (N,) nats, Fisher (N, P, P), score (N, P)) of atoms at
        ``positions`` (N, 3) Å with amplitudes (N,) image units · Å² and widths σ (N,) Å against the
        last `set_model` (which holds them in remove mode, not in add mode). Parameters: x, y, z (Å)
        [, log a, log σ]."""
        positions = np.asarray(positions, np.float64).reshape(-1, 3)
        n = len(positions)
        amplitudes = np.broadcast_to(np.asarray(amplitudes, np.float64), (n,))
        widths = np.broadcast_to(np.asarray(widths, np.float64), (n,))
        moments = np.zeros((n, self.n_proj, MOMENTS))
        for start in range(0, n, self.capacity):
            stop = min(start + self.capacity, n)
            pad = self.capacity - (stop - start)
            self.pos.from_numpy(np.pad(positions[start:stop], ((0, pad), (0, 0))).astype(self.np_dtype))
            self.amp.from_numpy(np.pad(amplitudes[start:stop], (0, pad)).astype(self.np_dtype))
            self.sigma.from_numpy(np.pad(widths[start:stop], (0, pad), constant_values=1.0).astype(self.np_dtype))
            self._run(self.projector, stop - start, 1 if add else 0)
            moments[start:stop] = self.moments.to_numpy()[:stop - start]
        upper = np.triu_indices(4)
        inplane = np.zeros((n, self.n_proj, 4, 4))
        inplane[:, :, upper[0], upper[1]] = moments[..., :10]
        inplane[:, :, upper[1], upper[0]] = moments[..., :10]
        t = self._world_frame()
        fisher = np.einsum("kpa,ikab,kqb->ipq", t, inplane, t)
        return moments[..., 14].sum(axis=1), fisher, np.einsum("kpa,ika->ip", t, moments[..., 10:14])

    def run(self, positions, amplitude: float, width: float, add: bool):
        """`evaluate` of tied atoms: ``amplitude`` expected counts per projection (the integral over
        the image in pixels), footprint width ``width`` Å, all atoms alike."""
        return self.evaluate(positions, amplitude * self.pixel_size ** 2, width, add)


def cached_likelihood_gain(projector, noise: str = "poisson", profile: AtomProfile = AtomProfile(),
                           free_shape: bool = False) -> LikelihoodGain:
    """A `LikelihoodGain` on ``projector`` (e.g. a `cached_projector`) for this noise model, profile
    and parameter set, shared for the Taichi session: its kernel compiles once. Its model, data,
    factors and variances belong to whoever set them last."""
    key = ("likelihood gain", id(projector), noise, profile, bool(free_shape))
    cache = session_cache()
    if key not in cache or cache[key].projector is not projector:
        cache[key] = LikelihoodGain(projector, noise, profile, free_shape)
    return cache[key]

