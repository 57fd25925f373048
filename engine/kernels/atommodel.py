"""The atom model: N isotropic 3D Gaussians as learnable parameters, with Adam, on the device.

Parameters are kept in a form that stays physical: positions p (Å) as they are, amplitudes as
log a (a > 0, data units · Å²), widths as log σ (σ > 0, Å; clamped to [SIGMA_MIN, SIGMA_MAX] when
rendered). Each atom renders as the Gaussians of its `AtomProfile` (one, or a core and a tail at
its position, fitted in `engine.physics.profile`; component k of atom i is cloud entry k·N + i, so
entries 0…N−1 hold the atoms' first components in atom order). The projector's `GaussianCloud` (``model.cloud``) always holds the physical values:
`set_state` and `adam_step` write it; `adam_step` chain-rules the cloud's gradients back to the
parameters and takes one Adam step (`engine.kernels.adam`) with a learning rate per parameter kind.
"""

import math
from dataclasses import dataclass

import numpy as np
import taichi as ti

from engine.kernels.adam import adam_direction
from engine.kernels.projector import GaussianCloud

SIGMA_MIN, SIGMA_MAX = 0.05, 2.5  # Å
PACKED = {"pos": slice(0, 3), "log_amp": 3, "log_sigma": 4, "m": slice(5, 10), "v": slice(10, 15), "age": 15}
"""Columns of an atom's row in `AtomModel.packed` (the step count `age` as a float: exact below 2²⁴)."""
PACKED_WIDTH = 16
LOG_SIGMA_MIN, LOG_SIGMA_MAX = math.log(SIGMA_MIN), math.log(SIGMA_MAX)


@dataclass(frozen=True)
class AtomProfile:
    """weights (K,) summing to 1 and extra variances (K,) Å² (the first 0) of an atom's Gaussians."""

    weights: tuple = (1.0,)
    extra_var: tuple = (0.0,)

    @property
    def components(self) -> int:
        return len(self.weights)

    def gaussians(self, amplitude, sigma):
        """Weights (…, K) and widths (…, K) Å of the Gaussians of atoms with these amplitudes and σ (Å)."""
        amplitude = np.asarray(amplitude, np.float64)[..., None]
        sigma = np.asarray(sigma, np.float64)[..., None]
        return amplitude * np.array(self.weights), np.sqrt(sigma**2 + np.array(self.extra_var))


@ti.data_oriented
class AtomModel:
    """Fields for ``capacity`` atoms (``count`` live): parameters, Adam moments and the rendered cloud."""

    def __init__(self, capacity: int, profile: AtomProfile = AtomProfile(), dtype=ti.f32):
        self.capacity = max(int(capacity), 1)
        self.count = 0
        self.profile = profile
        self.dtype = dtype
        self.cloud = GaussianCloud(self.capacity * profile.components, dtype=dtype)
        self.pos = ti.Vector.field(3, dtype, self.capacity)
        self.log_amp = ti.field(dtype, self.capacity)
        self.log_sigma = ti.field(dtype, self.capacity)
        # Adam moments: (position xyz, log amplitude, log width) per atom, and each atom's own step
        # count, so atoms born late get Adam's bias correction from their first step.
        self.m = ti.Vector.field(5, dtype, self.capacity)
        self.v = ti.Vector.field(5, dtype, self.capacity)
        self.age = ti.field(ti.i32, self.capacity)
        self.moved = ti.field(dtype, self.capacity)  # Å each atom moved in the last Adam step
        # The whole state of an atom in one row (`PACKED`), so the host reads or writes it in one
        # transfer each way (a density round) instead of one per field.
        self.packed = ti.Vector.field(PACKED_WIDTH, dtype, self.capacity)

    @property
    def numpy_dtype(self):
        return np.float64 if self.dtype == ti.f64 else np.float32

    # ------------------------------------------------------------------ host side
    def set_state(self, state: dict) -> None:
        """Upload atoms from a dict of NumPy arrays: pos (N, 3) Å, amp (N,), sigma (N,) Å, and
        optionally the Adam moments m, v (N, 5) and step counts age (N,). N must fit the capacity."""
        n = len(state["pos"])
        if n > self.capacity:
            raise ValueError(f"{n} atoms exceed the model's capacity {self.capacity}")
        rows = np.zeros((self.capacity, PACKED_WIDTH))
        rows[:n, PACKED["pos"]] = state["pos"]
        rows[:n, PACKED["log_amp"]] = np.log(np.maximum(state["amp"], 1e-30))
        rows[:n, PACKED["log_sigma"]] = np.log(np.clip(state["sigma"], SIGMA_MIN, SIGMA_MAX))
        rows[:n, PACKED["m"]] = state.get("m", 0.0)
        rows[:n, PACKED["v"]] = state.get("v", 0.0)
        rows[:n, PACKED["age"]] = state.get("age", 0)
        self.packed.from_numpy(rows.astype(self.numpy_dtype))
        self.count = n
        self.cloud.count = n * self.profile.components
        self._unpack(self.cloud, n)

    def get_state(self) -> dict:
        """The live atoms as NumPy float64 arrays (pos, amp, sigma, m, v) and int64 step counts (age)."""
        n = self.count
        self._pack(n)
        rows = self.packed.to_numpy()[:n].astype(np.float64)
        return {"pos": rows[:, PACKED["pos"]], "amp": np.exp(rows[:, PACKED["log_amp"]]),
                "sigma": np.clip(np.exp(rows[:, PACKED["log_sigma"]]), SIGMA_MIN, SIGMA_MAX),
                "m": rows[:, PACKED["m"]], "v": rows[:, PACKED["v"]], "age": rows[:, PACKED["age"]].astype(np.int64)}

    @ti.kernel
    def _pack(self, n: ti.i32):
        for i in range(n):
            p, m, v = self.pos[i], self.m[i], self.v[i]
            self.packed[i] = ti.Vector([p[0], p[1], p[2], self.log_amp[i], self.log_sigma[i],
                                        m[0], m[1], m[2], m[3], m[4], v[0], v[1], v[2], v[3], v[4],
                                        ti.cast(self.age[i], self.dtype)])

    @ti.kernel
    def _unpack(self, cloud: ti.template(), n: ti.i32):
        for i in range(self.capacity):  # the padding rows too: what lies beyond ``n`` is zero
            row = self.packed[i]
            self.pos[i] = ti.Vector([row[0], row[1], row[2]])
            self.log_amp[i] = row[3]
            self.log_sigma[i] = row[4]
            self.m[i] = ti.Vector([row[5], row[6], row[7], row[8], row[9]])
            self.v[i] = ti.Vector([row[10], row[11], row[12], row[13], row[14]])
            self.age[i] = ti.cast(row[15], ti.i32)
            if i < n:
                self._render(cloud, i, n)

    # ------------------------------------------------------------------ kernels
    @ti.func
    def _render(self, cloud: ti.template(), i, n):
        """Write atom i's Gaussians (of n atoms) into the cloud."""
        amp = ti.exp(self.log_amp[i])
        sigma = ti.min(ti.max(ti.exp(self.log_sigma[i]), self.dtype(SIGMA_MIN)), self.dtype(SIGMA_MAX))
        for k in ti.static(range(self.profile.components)):
            cloud.pos[k * n + i] = self.pos[i]
            cloud.amp[k * n + i] = amp * self.dtype(ti.static(self.profile.weights[k]))
            cloud.sigma[k * n + i] = ti.sqrt(sigma * sigma + self.dtype(ti.static(self.profile.extra_var[k])))


    @ti.kernel
    def _adam_step(self, cloud: ti.template(), n: ti.i32, lr_pos: ti.f32, lr_amp: ti.f32, lr_sigma: ti.f32,
                   grad_scale: ti.f32):
        for i in range(n):
            self.adam_atom(cloud, i, n, lr_pos, lr_amp, lr_sigma, grad_scale)

    @ti.func
    def adam_atom(self, cloud: ti.template(), i, n, lr_pos, lr_amp, lr_sigma, grad_scale):
        """Atom i's Adam step (of n atoms) from its Gaussians' gradients, and its new Gaussians (for
        `adam_step` and the fused step, `engine.kernels.step`)."""
        self.age[i] += 1
        # Sums over the atom's Gaussians: d/dlog a = Σ a_k dL/da_k; with σ_k² = σ² + Δ_k²,
        # d/dlog σ = Σ (σ²/σ_k) dL/dσ_k.
        gp = ti.Vector.zero(self.dtype, 3)
        ga = ti.cast(0.0, self.dtype)
        gs = ti.cast(0.0, self.dtype)
        sigma2 = ti.exp(2.0 * self.log_sigma[i])
        for k in ti.static(range(self.profile.components)):
            c = k * n + i
            gp += cloud.grad_pos[c]
            ga += cloud.grad_amp[c] * cloud.amp[c]
            gs += cloud.grad_sigma[c] * sigma2 / cloud.sigma[c]
        g = ti.Vector([gp[0], gp[1], gp[2], ga, gs]) * grad_scale
        step, m, v = adam_direction(g, self.m[i], self.v[i], self.age[i], self.dtype)
        self.m[i] = m
        self.v[i] = v
        move = lr_pos * ti.Vector([step[0], step[1], step[2]])
        self.pos[i] -= move
        self.moved[i] = move.norm()
        self.log_amp[i] -= lr_amp * step[3]
        self.log_sigma[i] = ti.min(ti.max(self.log_sigma[i] - lr_sigma * step[4], self.dtype(LOG_SIGMA_MIN)),
                                   self.dtype(LOG_SIGMA_MAX))
        self._render(cloud, i, n)  # right away: one kernel launch per step instead of two

    @ti.kernel
    def _set_shape(self, cloud: ti.template(), n: ti.i32, log_amp: ti.f32, log_sigma: ti.f32):
        for i in range(n):
            self.log_amp[i] = log_amp
            self.log_sigma[i] = log_sigma
            self._render(cloud, i, n)

    def set_shape(self, amplitude: float, sigma: float) -> None:
        """Give every atom this amplitude and width σ (Å), keeping positions and optimiser state: atoms
        whose shape is tied (one element's shared amplitude and width)."""
        self._set_shape(self.cloud, self.count, float(np.log(amplitude)),
                        float(np.log(np.clip(sigma, SIGMA_MIN, SIGMA_MAX))))

    @ti.kernel
    def _transform(self, cloud: ti.template(), n: ti.i32, rotation: ti.types.matrix(3, 3, ti.f32),
                   translation: ti.types.vector(3, ti.f32), log_amp_shift: ti.f32):
        for i in range(n):
            self.pos[i] = rotation @ self.pos[i] + translation
            self.log_amp[i] += log_amp_shift
            self._render(cloud, i, n)

    def transform(self, rotation: np.ndarray, translation: np.ndarray, log_amp_shift: float) -> None:
        """Move every atom rigidly, p → R p + t (Å), and scale every amplitude by exp(log_amp_shift)."""
        self._transform(self.cloud, self.count, ti.Matrix(np.asarray(rotation, np.float32)),
                        ti.Vector(np.asarray(translation, np.float32)), float(log_amp_shift))

    def largest_step(self) -> float:
        """The largest distance (Å) any atom moved in the last `adam_step` (0 without atoms)."""
        return float(self.moved.to_numpy()[:self.count].max()) if self.count else 0.0

    def adam_step(self, lr_pos: float, lr_amp: float, lr_sigma: float, grad_scale: float = 1.0) -> None:
        """One Adam step from the gradients in ``cloud``, which then holds the updated atoms; learning
        rates in Å (positions) and in natural-log units (amplitude, width)."""
        self._adam_step(self.cloud, self.count, lr_pos, lr_amp, lr_sigma, grad_scale)
