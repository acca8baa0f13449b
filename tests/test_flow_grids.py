"""Pipeline time grids: diffusers' FlowMatchEulerDiscreteScheduler grid and the sigmoid grid."""

import numpy as np
import pytest


@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
@pytest.mark.parametrize("n", [1, 5, 30])
def test_diffusers_grid_is_flow_match_euler_sigmas(shift, n):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from flagdit_jax.flow.timesteps import diffusers_grid

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    np.testing.assert_allclose(np.asarray(diffusers_grid(n, shift)), 1.0 - sched.sigmas.double().numpy(),
                               atol=1e-6, rtol=0)


def test_sigmoid_grid_is_finer_at_both_ends():
    from flagdit_jax.flow.timesteps import sigmoid_grid

    g = np.asarray(sigmoid_grid(10, mu=0.6, alpha=6.0))
    assert g[0] == 0.0 and g[-1] == 1.0 and np.all(np.diff(g) > 0)
    steps = np.diff(g)
    assert steps.argmax() not in (0, len(steps) - 1)
    assert steps[0] < steps[-1] < steps.max()  # mu > 0.5: the noise end is the finest
    # alpha -> 0 tends to the uniform grid.
    np.testing.assert_allclose(np.asarray(sigmoid_grid(10, alpha=1e-4)), np.linspace(0, 1, 11), atol=1e-4)
    with pytest.raises(ValueError, match="mu must be in"):
        sigmoid_grid(10, mu=1.5)
