"""When a fit is done, and the learning-rate schedule that gets it there without knowing the number
of steps in advance.

Every ``CHECK_EVERY`` steps the fit's loss L (the negative log-likelihood of the whole series, in
nats: χ²/2 for Gaussian noise) is read together with the largest distance any atom moved in the
last step. The fit has *settled* at its learning rate when L fell by less than

    max(LOSS_TOLERANCE · P, LOSS_RESOLUTION · L)

since the previous check. Below a relative 10⁻⁶ the single-precision sums of the loss cannot
resolve a change. P is what the caller asks settling to mean:

- P = the atoms' free parameters while their count may still change (when settling calls a density
  round): an improvement below ½ nat per parameter is what parameters wandering within their own
  error bars make (½ Δθᵀ F Δθ with Δθ ~ N(0, F⁻¹) is P/2 on average): the atoms are where the data
  put them, to within their uncertainty, so their count can be tested;
- P = 1 afterwards (learning-rate steps, alignment, convergence) and in refits: no improvement of
  ½ nat at all (Δχ² = 1), which no likelihood-ratio test could call significant. The slow last
  stretch of the widths, or an alignment's drift, stays under the first rule, and B-factors and
  alignments are read off exactly those.

Each time the fit settles the learning rates step down by ``LR_DROP``, to no less
than ``lr_final`` of the set values (reduce-on-plateau: no step count is needed). Settling at the
lowest rate is convergence once, in addition, no atom moved more than ``POSITION_TOLERANCE`` Å in the
last step (0.1 pm, a tenth of the smallest position errors we report). ``iters`` stays a cap.
"""

from __future__ import annotations

import math

CHECK_EVERY = 10            # steps between checks (each check reads two numbers from the device)
LOSS_TOLERANCE = 0.5        # nats (per free parameter where asked): Δχ² = 1
LOSS_RESOLUTION = 1e-6      # relative: what float32 sums of the loss resolve
POSITION_TOLERANCE = 1e-3   # Å per step (0.1 pm)
LR_DROP = 0.1               # factor of each step down of the learning rates

CONVERGED, CAPPED, INTERRUPTED = "converged", "reached the iteration cap", "interrupted"


class Convergence:
    """The plateau test and the learning-rate level of one fit (or refit). ``lr_final``: the lowest
    learning rates as a fraction of the set ones (1: a single level)."""

    def __init__(self, lr_final: float):
        self.lr_final = float(lr_final)
        self.level = 0
        self.last_loss = None

    @property
    def factor(self) -> float:
        """The learning rates' current fraction of the set values."""
        return max(LR_DROP ** self.level, self.lr_final)

    @property
    def lowest(self) -> bool:
        return self.factor <= self.lr_final

    def learning_rates(self, settings, names) -> dict:
        """The settings' learning rates ``names`` at the current level."""
        return {name: getattr(settings, name) * self.factor for name in names}

    def settled(self, loss: float, largest_step: float, parameters: int = 1) -> bool:
        """Whether the fit has settled at this level, given the loss now (nats, the whole series), the
        largest distance (Å) an atom moved in the last step and ``parameters``: P of the tolerance
        (the atoms' free parameters, or 1; see the module)."""
        previous, self.last_loss = self.last_loss, float(loss)
        if previous is None or not math.isfinite(loss):
            return False
        flat = previous - loss < max(LOSS_TOLERANCE * max(parameters, 1), LOSS_RESOLUTION * abs(loss))
        return flat and (not self.lowest or largest_step < POSITION_TOLERANCE)

    def step_down(self) -> bool:
        """Lower the learning rates one level; False when they are at the lowest already (converged)."""
        if self.lowest:
            return False
        self.level += 1
        return True

    def restart(self) -> None:
        """The model changed (atoms added or removed): the next check starts a new comparison."""
        self.last_loss = None

    def state(self) -> dict:
        return {"level": self.level, "last_loss": self.last_loss}

    def load_state(self, state: dict) -> None:
        self.level, self.last_loss = int(state["level"]), state["last_loss"]
