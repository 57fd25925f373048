"""Adam (Kingma and Ba, 2015): the one optimiser of every fitted parameter, atoms and alignment, on
the device. Parameters move by −lr · direction, with one learning rate per parameter kind and one
step count per row (an atom, a projection), so rows born late, or left out of a mini-batch, get
Adam's bias correction from their own first step."""

import numpy as np
import taichi as ti

BETA1 = 0.9     # decay of the gradient's running mean
BETA2 = 0.999   # decay of its running square
EPSILON = 1e-12  # keeps the step finite for a zero gradient; far below any real gradient's scale


@ti.func
def adam_direction(g, m, v, steps, dtype: ti.template()):
    """Adam's step direction for the gradient ``g`` (a vector) of a row with moments ``m``, ``v``
    and ``steps`` steps taken (this one included), in the parameters' type ``dtype``. Returns
    (direction, new m, new v)."""
    beta1, beta2 = dtype(BETA1), dtype(BETA2)
    bias1 = 1.0 - ti.pow(beta1, ti.cast(steps, dtype))
    bias2 = 1.0 - ti.pow(beta2, ti.cast(steps, dtype))
    m_new = beta1 * m + dtype(1 - BETA1) * g
    v_new = beta2 * v + dtype(1 - BETA2) * g * g
    return (m_new / bias1) / (ti.sqrt(v_new / bias2) + dtype(EPSILON)), m_new, v_new


@ti.data_oriented
class SharedParameters:
    """A few parameters shared by many atoms (e.g. one element's log width), stepped by Adam on the
    device; ``values`` is their host copy after each step."""

    def __init__(self, values):
        n = len(values)
        self.params = ti.field(ti.f32, n)
        self.m = ti.field(ti.f32, n)
        self.v = ti.field(ti.f32, n)
        self.reset(values)

    def reset(self, values) -> None:
        """Start again from ``values`` with fresh moments (no new fields, so no new compile)."""
        self.values = np.asarray(values, np.float64).copy()
        self.params.from_numpy(self.values.astype(np.float32))
        self.m.fill(0.0)
        self.v.fill(0.0)
        self.steps = 0

    @ti.kernel
    def _step(self, grad: ti.types.ndarray(), lr: ti.types.ndarray(), steps: ti.f32):
        for j in range(self.params.shape[0]):
            direction, m, v = adam_direction(ti.Vector([grad[j]]), ti.Vector([self.m[j]]), ti.Vector([self.v[j]]),
                                             steps, ti.f32)
            self.m[j] = m[0]
            self.v[j] = v[0]
            self.params[j] -= lr[j] * direction[0]

    def step(self, grad, lr) -> np.ndarray:
        """One Adam step for gradients ``grad`` with learning rates ``lr`` (one per parameter)."""
        self.steps += 1
        self._step(np.asarray(grad, np.float32), np.asarray(lr, np.float32), float(self.steps))
        self.values = self.params.to_numpy().astype(np.float64)
        return self.values
