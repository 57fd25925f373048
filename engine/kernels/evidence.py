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
    observed Hessian of −log L: the Fisher information + Σ_k T_kᵀ [Σ_p (y − with)/with² ∇c ∇c'ᵀ
             (Poisson) − Σ_p W (y − with) ∇²c (own blocks)] T_k
    spread   Poisson: Σ_k T_kᵀ [Σ_p W² (y − with)² ∇c ∇c'ᵀ] T_k, the scores' observed spread pixel by
             pixel (the Fisher information's estimate that does not trust the noise model: the
             middle of the sandwich covariance, `engine.fit.uncertainty`)

∇c the in-plane derivatives (u, v per Å; log a and log σ when the shape is free), T_k maps them to
the world frame (the first two rows of the rotation for the position). Parameters: the position
(3), or the position, log a and log σ (5) with ``free_shape``.

The footprints are the projector's own (`TiltSeriesProjector._footprint`, the widest component's,
with its truncation, geometry and blur) and the profiles are the projector's recurrence. An entry is
an atom with itself (its gain, score and Fisher block) or with a coupled neighbour (a cross block,
over the pixels both footprints cover); one thread per (entry, projection) writes that pair's
in-plane moments into its own slot (no atomics: safe on every backend), and the host maps them to
the world frame and sums them. Under Gaussian noise W is constant per projection, so every block is
a product of sums along the columns and along the rows (`_separable_block`, O(width + height)) and
only an atom's gain and score walk its pixels: the cost is about one forward projection of the
atoms. The data, model and atoms go to the kernel as arguments (no fields: a new instance compiles
nothing but its kernel, which Taichi's offline cache keeps between runs). The evidence rule of the
counted fit (`engine.fit.evidence`) and the per-atom uncertainties of every fit
(`engine.fit.uncertainty`) both run this kernel.
"""

import math
from typing import NamedTuple

import numpy as np
import taichi as ti

from engine.core.backend import session_cache
from engine.kernels.atommodel import AtomProfile

NOISE_MODELS = ("poisson", "gaussian")
CURVATURE_BASIS = 10  # monomials of the curvature sums (`_curvature_basis`)
POISSON_FLOOR = 1e-6  # counts: a model value below this is taken as this (log and 1/λ stay finite)


def curvature_hessian(sums: np.ndarray, inverse_variance: np.ndarray) -> np.ndarray:
    """Σ_p w c ∇²c (..., 4, 4) in the in-plane parameters (u, v px, log a, s² px²) from the kernel's
    curvature sums (..., K, `CURVATURE_BASIS`: Σ_p w c_j × [1, dx, dy, dx², dx dy, dy², dx r², dy r²,
    r², r⁴] per component j) and the components' 1/s² (N, K) px⁻² (N the leading axis of ``sums``).
    Each component c = A/(2π s²) exp(−r²/2s²) has ∂²c/∂u² = c (dx²/s⁴ − 1/s²), ∂²c/∂u∂v = c dx dy/s⁴,
    ∂²c/∂u∂log a = c dx/s², ∂²c/∂u∂s² = c dx (r²/2s⁶ − 2/s⁴), ∂²c/∂log a ∂s² = c (r²/2s⁴ − 1/s²),
    ∂²c/∂(s²)² = c (r⁴/4s⁸ − 2r²/s⁶ + 2/s⁴) and ∂²c/∂(log a)² = c."""
    m = np.moveaxis(np.asarray(sums, np.float64), -1, 0)  # (10, N, n, K)
    q = np.asarray(inverse_variance, np.float64)[:, None, :]  # (N, 1, K)
    out = np.zeros(m.shape[1:3] + (4, 4))
    entries = {(0, 0): q * q * m[3] - q * m[0], (0, 1): q * q * m[4], (1, 1): q * q * m[5] - q * m[0],
               (0, 2): q * m[1], (1, 2): q * m[2], (2, 2): m[0],
               (0, 3): 0.5 * q ** 3 * m[6] - 2.0 * q * q * m[1], (1, 3): 0.5 * q ** 3 * m[7] - 2.0 * q * q * m[2],
               (2, 3): 0.5 * q * q * m[8] - q * m[0], (3, 3): 0.25 * q ** 4 * m[9] - 2.0 * q ** 3 * m[8] + 2.0 * q * q * m[0]}
    for (a, b), value in entries.items():
        out[..., a, b] = out[..., b, a] = value.sum(axis=-1)
    return out


class AtomMoments(NamedTuple):
    """What `LikelihoodGain.evaluate` gives, per atom: ``gain`` (N,) nats, the Fisher information
    ``fisher`` (N, P, P) and the ``score`` (N, P) (per Å, per log a, per log σ); per coupled pair
    the cross blocks ``cross`` (M, P, P) (None without pairs); with observed information asked
    for, ``observed`` (N, P, P) and ``observed_cross`` (M, P, P), and under Poisson noise the
    scores' spread ``spread`` (N, P, P) and ``spread_cross`` (M, P, P), else None."""
    gain: np.ndarray
    fisher: np.ndarray
    score: np.ndarray
    cross: np.ndarray | None
    observed: np.ndarray | None
    observed_cross: np.ndarray | None
    spread: np.ndarray | None = None
    spread_cross: np.ndarray | None = None


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
        # Side of the derivative block the kernel writes: Gaussian noise, five pieces that `evaluate`
        # sums into the four derivatives (`_separable_block`); counts, the four.
        self.block_side = 4 if noise == "poisson" else 5
        # With observed information: the weight change and the spread (4 × 4 each) and each
        # component's curvature sums.
        self.observed_moments = 32 + len(self.weights) * CURVATURE_BASIS
        # Host arrays handed to the kernel as arguments (no fields: nothing to allocate or compile
        # per instance beyond the kernel itself).
        self.model = self.data = None
        self.factor = np.ones(self.n_proj, self.np_dtype)
        self.inverse_variance = np.ones(self.n_proj)

    def set_counts(self, data: np.ndarray) -> None:
        """The measured data y (n, H, W): counts (Poisson) or image units (Gaussian)."""
        self.data = np.ascontiguousarray(data, self.np_dtype)

    def set_model(self, expected: np.ndarray) -> None:
        """The model m (n, H, W) that gains are measured against, in the data's units."""
        self.model = np.ascontiguousarray(expected, self.np_dtype)

    def set_factor(self, factor) -> None:
        """f_k (n,): what an atom's rendering is multiplied by in projection k (default 1)."""
        self.factor[:] = np.broadcast_to(np.asarray(factor, np.float64), (self.n_proj,))

    def set_noise_variance(self, variance) -> None:
        """The Gaussian noise variance v_k (n,) per projection, in the data's units squared."""
        self.inverse_variance[:] = 1.0 / np.broadcast_to(np.asarray(variance, np.float64), (self.n_proj,))

    @ti.func
    def _footprint(self, proj, k, atoms: ti.template(), i, factor):
        """Atom i's footprint in projection k: its centre (col, row) and pixel box (the projector's,
        of the widest component), and per component 1/s² (px⁻²) and the peak f_k a w_j / 2π s_j²."""
        ps2, sig = self.dtype(self.pixel_size ** 2), atoms[i, 4]
        widest = ti.sqrt(sig * sig + self.dtype(self.widest_extra))
        p = ti.Vector([atoms[i, 0], atoms[i, 1], atoms[i, 2]])
        col, row, _, _, _, c_lo, c_hi, r_lo, r_hi = proj._footprint(k, p, widest)
        inv_s2 = ti.Vector([ps2 / (sig * sig + self.dtype(v + proj.blur_sigma ** 2)) for v in ti.static(self.extras)])
        peak = ti.Vector([self.dtype(w / (2.0 * math.pi)) for w in ti.static(self.weights)]) * inv_s2
        return col, row, c_lo, c_hi, r_lo, r_hi, inv_s2, peak * (factor * atoms[i, 3] / ps2)

    @ti.func
    def _derivatives(self, c, inv_s2, dx, dy, first: ti.template()):
        """(∂u · ps, ∂v · ps, ∂log a, ∂s²) of the atom whose components are c[first:first + K] (1/s²
        px⁻² inv_s2[first:first + K]) at offset (dx, dy) px from its centre (s² in px²; `evaluate`
        turns them into per Å and per log σ)."""
        atom, radial, curvature = c[first], c[first] * inv_s2[first], c[first] * inv_s2[first] * inv_s2[first]
        for j in ti.static(range(first + 1, first + len(self.weights))):
            atom, radial, curvature = atom + c[j], radial + c[j] * inv_s2[j], curvature + c[j] * inv_s2[j] * inv_s2[j]
        return ti.Vector([radial * dx, radial * dy, atom, 0.5 * (dx * dx + dy * dy) * curvature - radial])

    @ti.func
    def _curvature_basis(self, dx, dy):
        """The monomials at offset (dx, dy) px whose sums, weighted by a component's value, give the
        atom's Hessian in the parameters of `_derivatives` (`curvature_hessian`)."""
        r2 = dx * dx + dy * dy
        return ti.Vector([1.0, dx, dy, dx * dx, dx * dy, dy * dy, dx * r2, dy * r2, r2, r2 * r2], self.dtype)

    @ti.func
    def _pieces(self, across, linear, square):
        """One atom's five derivative pieces' factors along one image axis (``across``: columns, else
        rows), given its d/s² (``linear``) and d²/2s⁴ (+ −1/s² along the rows, ``square``): the
        pieces are radial · dx, radial · dy, the component, and the widening's dx and dy halves, each
        a column factor times a row factor of the component."""
        return ti.Vector([ti.select(across, linear, 1.0), ti.select(across, 1.0, linear), 1.0,
                          ti.select(across, square, 1.0), ti.select(across, 1.0, square)])

    @ti.func
    def _separable_block(self, proj, box, centre, inv_s2, peak):
        """Σ_p P P'ᵀ (5 × 5, W = 1) over the pixel box of the atom's and the partner's derivative
        pieces (`_pieces`; `evaluate` sums the last two into the widening) from sums along the
        columns and along the rows alone: every component is a peak times a column profile times a
        row profile and every piece a column factor times a row factor, so each sum over the box is
        a column sum times a row sum, O(width + height) per pair instead of O(width · height). The
        profiles by the projector's recurrence."""
        K = ti.static(len(self.weights))
        block = ti.Matrix([[0.0] * 5] * 5, self.dtype)
        for jl in range(K * K):  # component j of the atom, l of the partner (loops: compiled once)
            j, l = jl // K, K + jl % K
            inv = ti.Vector([inv_s2[j], inv_s2[l]])
            half = 0.5 * inv
            product = ti.Matrix([[peak[j] * peak[l]] * 5] * 5, self.dtype)
            for axis in range(2):  # columns, then rows
                centres = ti.Vector([centre[0, axis], centre[1, axis]])
                offset = -inv * axis  # the widening's −1/s² goes with the row factor
                e, q = proj._walk_start(box[2 * axis] - centres, half)
                step = ti.exp(-inv)
                sums = ti.Matrix([[0.0] * 5] * 5, self.dtype)
                for x in range(box[2 * axis], box[2 * axis + 1] + 1):
                    d = x - centres
                    g = proj._gaussian(d, half, e)
                    e, q = e * q, q * step
                    linear, square = inv * d, half * inv * d * d + offset
                    first = self._pieces(axis == 0, linear[0], square[0]) * g[0]
                    sums += first.outer_product(self._pieces(axis == 0, linear[1], square[1]) * g[1])
                product *= sums
            block += product
        return block

    @ti.kernel
    def _run(self, proj: ti.template(), atoms: ti.types.ndarray(), entries: ti.types.ndarray(),
             model: ti.types.ndarray(), data: ti.types.ndarray(), factor: ti.types.ndarray(),
             moments: ti.types.ndarray(), axes: ti.types.ndarray(), add: ti.i32, observed: ti.i32):
        """Per (entry, projection): the in-plane moments of the entry's atom and partner (the atom
        itself on the diagonal) over the pixels both footprints cover: Σ_p W ∇c ∇c'ᵀ (W = 1 for
        Gaussian noise, its 1/v_k applied by `evaluate`; there as the 5 × 5 block of derivative
        pieces, `_separable_block`), and for an atom's own entry Σ_p W (y − with) ∇c and its gain,
        ∇c = `_derivatives`. With ``observed``, also what the observed information adds to the
        Fisher information: under Poisson noise for every entry Σ_p (y − with)/with² ∇c ∇c'ᵀ, and for
        an atom's own entry the sums Σ_p W (y − with) c_j × `_curvature_basis` per component j, which
        `curvature_hessian` turns into Σ_p W (y − with) ∇²c, and under Poisson noise for every entry
        the spread Σ_p W² (y − with)² ∇c ∇c'ᵀ. Layout per slot: the block (row-major), the score (4),
        the gain, then (`observed_moments`) the weight change and the spread (4 × 4 each, row-major)
        and the curvature sums (K × `CURVATURE_BASIS`). The
        first entry's thread also writes the image axes u, v of projection k in the world frame (the
        rows of its rotation) into ``axes``."""
        K = ti.static(len(self.weights))
        for e, k in ti.ndrange(entries.shape[0], self.n_proj):
            # The atom's and the partner's footprints (a loop, so that its code is compiled once):
            # centres (col, row) px, per component 1/s² and peak (the atom's K, then the partner's),
            # and the box of the pixels both cover.
            centre = ti.Matrix([[0.0, 0.0], [0.0, 0.0]], self.dtype)
            inv_s2 = ti.Vector([0.0] * (2 * K), self.dtype)
            peak = ti.Vector([0.0] * (2 * K), self.dtype)
            box = ti.Vector([0, self.width - 1, 0, self.height - 1])
            for t in range(2):
                col, row, c_lo, c_hi, r_lo, r_hi, one_inv_s2, one_peak = self._footprint(
                    proj, k, atoms, entries[e, t], factor[k])
                centre[t, 0] = col
                centre[t, 1] = row
                box = ti.Vector([ti.max(box[0], c_lo), ti.min(box[1], c_hi),
                                 ti.max(box[2], r_lo), ti.min(box[3], r_hi)])
                for j in ti.static(range(K)):
                    inv_s2[t * K + j] = one_inv_s2[j]
                    peak[t * K + j] = one_peak[j]
            col = ti.Vector([centre[j // K, 0] for j in ti.static(range(2 * K))])  # per component
            row = ti.Vector([centre[j // K, 1] for j in ti.static(range(2 * K))])
            inv2s2 = 0.5 * inv_s2
            step = ti.exp(-inv_s2)
            ey, qy = proj._walk_start(box[2] - row, inv2s2)
            ex0, qx0 = proj._walk_start(box[0] - col, inv2s2)
            block = ti.Matrix([[0.0] * 4] * 4, self.dtype)  # Poisson
            curvature = ti.Matrix([[0.0] * CURVATURE_BASIS] * K, self.dtype)  # observed: Σ W (y − with) c_j × basis
            reweight = ti.Matrix([[0.0] * 4] * 4, self.dtype)  # observed, Poisson: Σ (y − with)/with² ∇c ∇c'ᵀ
            spread = ti.Matrix([[0.0] * 4] * 4, self.dtype)  # observed, Poisson: Σ W² (y − with)² ∇c ∇c'ᵀ
            own = entries[e, 0] == entries[e, 1]
            score = ti.Vector([0.0] * 4, self.dtype)
            total = self.dtype(0.0)
            walk = own  # Gaussian noise: a cross block needs no pixel walk
            if ti.static(self.noise == "poisson"):
                walk = True
            for r in range(box[2], box[3] + 1 if walk else box[2]):
                ry = peak * proj._gaussian(r - row, inv2s2, ey)
                ey, qy = ey * qy, qy * step
                ex, qx = ex0, qx0
                for c in range(box[0], box[1] + 1):
                    components = ry * proj._gaussian(c - col, inv2s2, ex)
                    ex, qx = ex * qx, qx * step
                    g = self._derivatives(components, inv_s2, c - col[0], r - row[0], 0)
                    atom, y = g[2], data[k, r, c]
                    with_atom = model[k, r, c] + atom * add
                    weight = self.dtype(1.0)
                    if ti.static(self.noise == "poisson"):
                        with_atom = ti.max(with_atom, self.dtype(POISSON_FLOOR))
                        without = ti.max(with_atom - atom, self.dtype(POISSON_FLOOR))
                        total -= with_atom - without
                        if y > 0.0:
                            total += y * ti.log(with_atom / without)
                        weight = 1.0 / with_atom
                        h = self._derivatives(components, inv_s2, c - col[K], r - row[K], K)
                        block += (weight * g).outer_product(h)
                        if observed:
                            pull = (y - with_atom) * weight
                            reweight += (pull * weight * g).outer_product(h)
                            spread += (pull * pull * g).outer_product(h)
                    else:
                        total += (2.0 * (y - with_atom) + atom) * atom * 0.5
                    score += (y - with_atom) * weight * g
                    if observed and own:
                        atom_components = ti.Vector([components[j] for j in ti.static(range(K))])
                        curvature += ((y - with_atom) * weight * atom_components).outer_product(
                            self._curvature_basis(c - col[0], r - row[0]))
            side = ti.static(self.block_side)
            if ti.static(self.noise != "poisson"):
                pieces = self._separable_block(proj, box, centre, inv_s2, peak)
                for m in range(side * side):
                    moments[e, k, m] = pieces[m // side, m % side]
            else:
                for m in range(side * side):
                    moments[e, k, m] = block[m // side, m % side]
            for m in range(4):
                moments[e, k, side * side + m] = score[m]
            moments[e, k, side * side + 4] = total
            if observed:
                for m in range(16):
                    moments[e, k, side * side + 5 + m] = reweight[m // 4, m % 4]
                    moments[e, k, side * side + 21 + m] = spread[m // 4, m % 4]
                for m in range(K * CURVATURE_BASIS):
                    moments[e, k, side * side + 37 + m] = curvature[m // CURVATURE_BASIS, m % CURVATURE_BASIS]
            if e == 0:
                rotation = proj.rot[k]
                for m in range(6):
                    axes[k, m // 3, m % 3] = rotation[m // 3, m % 3]

    def _world_frame(self, axes: np.ndarray, side: int | None = None) -> np.ndarray:
        """T_k (n, P, side): the kernel's in-plane derivatives (u, v px, log a, s² px²; under Gaussian
        noise the five pieces, the last two the widening's halves; ``side`` 4: the four derivatives
        whatever the noise) → the parameters (before their units), given the image axes u, v (n, 2, 3)
        of the geometry they were taken in."""
        side = self.block_side if side is None else side
        t = np.zeros((self.n_proj, self.n_params, side))
        t[:, :3, :2] = axes.transpose(0, 2, 1)
        if self.free_shape:
            t[:, 3, 2] = 1.0
            t[:, 4, 3:] = 1.0
        return t

    def _inverse_variances(self, widths: np.ndarray) -> np.ndarray:
        """(N, K) 1/s² px⁻² of each atom's profile components (width σ Å, the component's extra
        variance and the projector's blur), as the kernel's `_footprint` has them."""
        variance = (np.asarray(widths, np.float64)[:, None] ** 2 + np.array(self.extras)[None, :]
                    + self.projector.blur_sigma ** 2)
        return self.pixel_size ** 2 / variance

    def _launches(self, entries: np.ndarray, atoms: np.ndarray, add: bool, observed: bool = False):
        """What the kernel writes (`_run`) for the entries (E, 2), atom ``entries[e, 0]`` with partner
        ``entries[e, 1]`` of ``atoms`` (N, 5: x, y, z Å, amplitude, width σ Å), ``capacity`` entries
        per launch: yields (start, stop, what entries start..stop wrote (stop − start, n, side² + 5
        [+ `observed_moments` with ``observed``]),
        the image axes (n, 2, 3)). The buffer is reused: take what is needed before the next launch
        (held whole, it would grow as atoms × projections: gigabytes at 10⁵ atoms)."""
        if self.model is None or self.data is None:
            raise RuntimeError("set_model and set_counts first")
        slot = self.block_side ** 2 + 5 + (self.observed_moments if observed else 0)
        written = np.zeros((min(len(entries), self.capacity), self.n_proj, slot), self.np_dtype)
        axes = np.zeros((self.n_proj, 2, 3), self.np_dtype)
        atoms = np.ascontiguousarray(atoms, self.np_dtype)
        for start in range(0, len(entries), self.capacity):
            stop = min(start + self.capacity, len(entries))
            self._run(self.projector, atoms, np.ascontiguousarray(entries[start:stop], np.int32), self.model,
                      self.data, self.factor, written[:stop - start], axes, 1 if add else 0, 1 if observed else 0)
            yield start, stop, written[:stop - start], axes.astype(np.float64)

    def evaluate(self, positions, amplitudes, widths, add: bool = False, pairs=None,
                 observed: bool = False) -> AtomMoments:
        """`AtomMoments` of atoms at ``positions`` (N, 3) Å with amplitudes (N,) image units · Å² and
        widths σ (N,) Å against the last `set_model` (which holds them in remove mode, not in add
        mode). Parameters: x, y, z (Å) [, log a, log σ]. With ``pairs`` (M, 2) of atom indices, also
        the cross blocks (M, P, P) of the Fisher information between those atoms (the joint
        information's off-diagonal blocks); with ``observed``, also the observed information (the
        Hessian of −log L at these parameters and data) of the atoms and pairs, and under Poisson
        noise the scores' spread, Σ over pixels of each pixel's score times its transpose."""
        positions = np.asarray(positions, np.float64).reshape(-1, 3)
        n = len(positions)
        amplitudes = np.broadcast_to(np.asarray(amplitudes, np.float64), (n,))
        widths = np.broadcast_to(np.asarray(widths, np.float64), (n,))
        atoms = np.arange(n)
        pairs = np.zeros((0, 2), int) if pairs is None else np.asarray(pairs, int).reshape(-1, 2)
        entries = np.concatenate([np.column_stack([atoms, atoms]), pairs])
        side, pq = self.block_side, self.n_params
        weight = self.inverse_variance if self.noise == "gaussian" else np.ones(self.n_proj)
        blocks, gain, score = np.zeros((len(entries), pq, pq)), np.zeros(n), np.zeros((n, pq))
        # Observed: the Fisher blocks plus Σ (y − with)/with² ∇c∇c'ᵀ (Poisson), less the curvature.
        change = np.zeros((len(entries), pq, pq)) if observed else None
        spread = np.zeros((len(entries), pq, pq)) if observed and self.noise == "poisson" else None
        frame = None
        for start, stop, written, axes in self._launches(entries, np.column_stack([positions, amplitudes, widths]),
                                                         add, observed):
            # Σ_k w_k T_k M_k T_kᵀ and Σ_k w_k T_k s_k (w_k the Gaussian 1/v_k) as single matrix products
            # over (k, a, b) and (k, a); the units follow below. Every launch sees the same geometry.
            if frame is None:
                t = self._world_frame(axes)
                frame = np.einsum("kpa,kqb,k->kabpq", t, t, weight).reshape(-1, pq * pq)
                t4 = self._world_frame(axes, 4)
                score_frame = (t4 * weight[:, None, None]).transpose(0, 2, 1).reshape(-1, pq)
                frame4 = np.einsum("kpa,kqb,k->kabpq", t4, t4, weight).reshape(-1, pq * pq)
            blocks[start:stop] = (written[..., :side * side].reshape(stop - start, -1) @ frame).reshape(-1, pq, pq)
            own = written[:max(0, min(stop, n) - start)]  # the first n entries are the atoms themselves
            if len(own):
                gain[start:start + len(own)] = own[..., side * side + 4] @ weight
                own_score = own[..., side * side:side * side + 4].reshape(len(own), -1)
                score[start:start + len(own)] = own_score @ score_frame
            if observed:
                first = side * side + 5
                if self.noise == "poisson":  # (Gaussian noise: W does not depend on the model)
                    reweight = written[..., first:first + 16].reshape(stop - start, -1) @ frame4
                    change[start:stop] = reweight.reshape(-1, pq, pq)
                    spread[start:stop] = (written[..., first + 16:first + 32].reshape(stop - start, -1)
                                          @ frame4).reshape(-1, pq, pq)
                if len(own):
                    sums = own[..., first + 32:].reshape(len(own), self.n_proj, len(self.weights), CURVATURE_BASIS)
                    atom = np.arange(start, start + len(own))
                    hessian = curvature_hessian(sums, self._inverse_variances(widths[atom]))
                    change[start:start + len(own)] -= (hessian.reshape(len(own), -1) @ frame4).reshape(-1, pq, pq)
        # Units: px → Å for the position, s² (px²) → log σ.
        units = np.ones((n, pq))
        units[:, :3] = 1.0 / self.pixel_size
        if self.free_shape:
            units[:, 4] = 2.0 * widths ** 2 / self.pixel_size ** 2
        scale = units[entries[:, 0], :, None] * units[entries[:, 1], None, :]
        blocks *= scale
        observed_blocks = None
        if observed:
            observed_blocks = blocks + change * scale
            if spread is not None:
                spread *= scale
            if self.free_shape:  # log σ enters s² nonlinearly: ∂²s²/∂(log σ)² = 2 ∂s²/∂log σ
                observed_blocks[atoms, 4, 4] -= 2.0 * score[:, 4] * units[:, 4]
        return AtomMoments(gain, blocks[:n], score * units, blocks[n:] if len(pairs) else None,
                           None if observed_blocks is None else observed_blocks[:n],
                           None if observed_blocks is None or not len(pairs) else observed_blocks[n:],
                           None if spread is None else spread[:n],
                           None if spread is None or not len(pairs) else spread[n:])

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

