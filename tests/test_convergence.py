"""The stopping rule and the learning-rate levels it drives (`engine.fit.convergence`)."""

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


def test_large_losses_are_compared_at_float32_resolution_and_state_round_trips():
    c = Convergence(lr_final=1.0)                                 # a single level
    c.settled(1e8, 0.0)
    assert c.settled(1e8 - 50.0, 0.0)                             # 50 nats below 1e-6 of the loss: flat
    restored = Convergence(1.0)
    restored.load_state(c.state())
    assert restored.state() == c.state() and not restored.step_down()
    restored.restart()
    assert not restored.settled(1e8, 0.0)                         # after a model change: a new reference
