"""The stopping rule and the learning-rate levels it drives (`engine.fit.convergence`)."""

import numpy as np
import pytest

from engine.fit.convergence import LOSS_TOLERANCE, POSITION_TOLERANCE, Convergence


def test_levels_step_down_to_lr_final_then_converge():
    c = Convergence(lr_final=0.02)
    assert c.factor == 1.0 and not c.settled(1000.0, 0.1)        # the first check only sets the reference
    assert not c.settled(1000.0 - 2 * LOSS_TOLERANCE, 0.1)        # still improving by more than ½ nat
    assert c.settled(1000.0 - 2.2 * LOSS_TOLERANCE, 0.1)          # flat; steps may be large above the lowest level
    assert c.step_down() and c.factor == pytest.approx(0.1)
    assert c.step_down() and c.factor == pytest.approx(0.02)      # 0.01 would undercut lr_final
    assert c.lowest
    # At the lowest rates a flat loss is not enough: no atom may still move by 0.1 pm per step.
    assert not c.settled(998.0, 10 * POSITION_TOLERANCE)
    assert c.settled(998.0, 0.5 * POSITION_TOLERANCE)
    assert not c.step_down()                                      # converged


def test_the_tolerance_is_half_a_nat_per_free_parameter():
    """An improvement of 30 nats is progress for 10 free parameters (Δχ² 6 each) and a plateau for
    100 (0.6 each: what parameters wandering within their error bars give)."""
    for parameters, flat in ((10, False), (100, True)):
        c = Convergence(lr_final=0.02)
        c.settled(1000.0, 0.1, parameters)
        assert c.settled(970.0, 0.1, parameters) is flat


def test_large_losses_are_compared_at_float32_resolution_and_state_round_trips():
    c = Convergence(lr_final=1.0)                                 # a single level
    c.settled(1e8, 0.0)
    assert c.settled(1e8 - 50.0, 0.0)                             # 50 nats below 1e-6 of the loss: flat
    restored = Convergence(1.0)
    restored.load_state(c.state())
    assert restored.state() == c.state() and not restored.step_down()
    restored.restart()
    assert not restored.settled(1e8, 0.0)                         # after a model change: a new reference


class Rounds:
    """A density-control strategy whose rounds report the given changes, one per call."""

    def __init__(self, *changes):
        self.changes = list(changes)

    def round(self, problem, spawn=True):
        return self.changes.pop(0)


def test_counting_ends_at_the_first_round_that_adds_no_atom(tmp_path):
    """Culls alone end counting (every atom left was tested, the residual searched); a spawn, split
    or merge brings a new atom, which another round must test."""
    from engine.fit.settings import fit_settings
    from engine.fit.trainer import Trainer

    none = {"culled": 0, "merged": 0, "split": 0, "spawned": 0}
    for added, rounds in (("spawned", 2), ("split", 2), ("merged", 2), (None, 1)):
        first = {**none, "culled": 5, **({added: 1} if added else {})}
        trainer = Trainer(problem=None, strategy=Rounds(first, none), settings=fit_settings(), out_dir=tmp_path,
                          rng=np.random.default_rng(0), progress=False)
        while trainer.schedule["counting"]:
            trainer.schedule["round_due"] = True
            trainer._round()
        assert trainer.schedule["rounds"] == rounds, added
