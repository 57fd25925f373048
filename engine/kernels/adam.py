"""Adam (Kingma and Ba, 2015): the one optimiser of every fitted parameter, atoms and alignment, on
the device. Parameters move by −lr · direction, with one learning rate per parameter kind and one
step count per row (an atom, a projection), so rows born late, or left out of a mini-batch, get
Adam's bias correction from their own first step."""

import taichi as ti

BETA1 = 0.9     # decay of the gradient's running mean
BETA2 = 0.999   # decay of its running square
EPSILON = 1e-12  # keeps the step finite for a zero gradient; far below any real gradient's scale


@ti.func
def adam_direction(g, m, v, steps):
    """Adam's step direction for the gradient ``g`` (a vector) of a row with moments ``m``, ``v``
    and ``steps`` steps taken (this one included; a float of the parameters' type). Returns
    (direction, new m, new v)."""
    bias1 = 1.0 - ti.pow(BETA1, steps)
    bias2 = 1.0 - ti.pow(BETA2, steps)
    m_new = BETA1 * m + (1 - BETA1) * g
    v_new = BETA2 * v + (1 - BETA2) * g * g
    return (m_new / bias1) / (ti.sqrt(v_new / bias2) + EPSILON), m_new, v_new
