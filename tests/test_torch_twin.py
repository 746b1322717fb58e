"""The Torch twin against the Numba kernels: same equations, same fixed points, same step counts (float64)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ebm_sim import torch_twin  # noqa: E402
from ebm_sim.network import Network  # noqa: E402
from ebm_sim.relax import relax  # noqa: E402


@pytest.fixture(scope="module")
def problem():
    network = Network.init((12, 9, 7, 4), seed=3, dtype=np.float64, gain=1.5)
    x = np.random.default_rng(1).random((6, 12))
    target = np.eye(4)[np.arange(6) % 4]
    return network, x, target


@pytest.mark.parametrize("method", ["fixed_point", "euler", "alternating"])
@pytest.mark.parametrize("beta", [0.0, 0.4])
@pytest.mark.parametrize("hoist", [False, True])
def test_twin_matches_numba_fixed_points(problem, method, beta, hoist):
    network, x, target = problem
    numba = relax(network, x, method=method, tol=1e-10, max_steps=5000, beta=beta, target=target)
    twin = torch_twin.relax(network, x, method=method, tol=1e-10, max_steps=5000, beta=beta, target=target,
                            hoist_input=hoist)
    assert numba.converged.all() and bool(twin.converged.all())
    for ours, theirs in zip(numba.states, twin.states):
        np.testing.assert_allclose(theirs.numpy(), ours, atol=1e-12)
    # the twin stops the whole batch when the slowest sample converges: the largest step count of the kernels
    assert twin.steps == numba.steps.max()


def test_twin_single_step_equals_reference_step(problem):
    """One step from the same random state, through both implementations' local fields."""
    from ebm_sim import energy
    network, x, target = problem
    states = [np.random.default_rng(k).random((6, n)) for k, n in enumerate(network.layer_sizes[1:])]
    weights, biases = torch_twin.to_torch(network)
    fields = torch_twin.local_fields(weights, biases, torch.from_numpy(x), [torch.from_numpy(s) for s in states],
                                     0.4, torch.from_numpy(target))
    for theirs, ours in zip(fields, energy.local_fields(network, x, states, 0.4, target)):
        np.testing.assert_allclose(theirs.numpy(), ours, rtol=1e-13, atol=1e-13)


def test_twin_refuses_unknown_method(problem):
    network, x, _ = problem
    with pytest.raises(ValueError, match="rk45"):
        torch_twin.relax(network, x, method="rk45")
