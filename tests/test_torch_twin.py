"""The Torch twin against the Numba kernels: same equations, same fixed points, same step counts, same EP step."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ebm_sim import torch_twin  # noqa: E402
from ebm_sim.network import Network  # noqa: E402
from ebm_sim.relax import relax  # noqa: E402
from ebm_sim.training import TrainConfig, ep_gradient  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=[False, True], ids=["mse", "readout"])
def problem(request):
    network = Network.init((12, 9, 7, 4), seed=3, dtype=np.float64, gain=1.5, readout=request.param)
    x = np.random.default_rng(1).random((6, 12))
    target = np.eye(4)[np.arange(6) % 4]
    return network, x, target


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["fixed_point", "euler", "alternating"])
@pytest.mark.parametrize("beta", [0.0, 0.4])
def test_twin_matches_numba_states_and_steps(problem, method, beta, device):
    network, x, target = problem
    for tol in (1e-10, 1e-3):
        numba = relax(network, x, method=method, tol=tol, max_steps=5000, beta=beta, target=target)
        twin = torch_twin.relax(network, x, method=method, tol=tol, max_steps=5000, beta=beta, target=target,
                                device=device)
        np.testing.assert_array_equal(twin.steps.cpu().numpy(), numba.steps)  # per-sample stopping, like Numba
        for ours, theirs in zip(numba.states, twin.states):
            np.testing.assert_allclose(theirs.cpu().numpy(), ours, atol=1e-12)
        np.testing.assert_array_equal(np.argmax(twin.logits.cpu().numpy(), axis=1), numba.predictions())


@pytest.mark.parametrize("hoist", [False, True])
def test_batch_level_stopping_reaches_the_same_fixed_point(problem, hoist):
    network, x, _ = problem
    numba = relax(network, x, tol=1e-11, max_steps=5000)
    twin = torch_twin.relax(network, x, tol=1e-11, max_steps=5000, hoist_input=hoist, per_sample=False)
    assert bool(twin.converged.all()) and int(twin.steps[0]) == numba.steps.max()
    for ours, theirs in zip(numba.states, twin.states):
        np.testing.assert_allclose(theirs.numpy(), ours, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nudging", ["symmetric", "positive"])
def test_twin_ep_step_equals_the_numba_ep_step(problem, nudging, device):
    network, x, target = problem
    common = dict(nudging=nudging, beta=0.3, tol=1e-9, free_steps=500, nudged_steps=200,
                  cost="cross_entropy" if network.readout else "mse")
    ours = ep_gradient(network, x, target, TrainConfig(**common))
    theirs = ep_gradient(network, x, target, TrainConfig(backend="torch", device=device, **common))
    np.testing.assert_array_equal(theirs.free_steps, ours.free_steps)
    for a, b in zip(ours.gradient, theirs.gradient):
        np.testing.assert_allclose(b, a, atol=1e-11)


@pytest.mark.parametrize("readout", [False, True])
def test_classifier_gradients_flow_through_every_step(readout):
    """BPTT through the deployed relaxation: the input gradient matches central differences of the logits (weights
    small enough that the outputs are not clamped, else the true gradient is zero)."""
    network = Network.init((12, 9, 7, 4), seed=3, dtype=np.float64, gain=0.7, readout=readout)
    x = np.random.default_rng(1).random((6, 12))
    model = torch_twin.EBMClassifier(network, max_steps=60, tol=0.0)
    images = torch.tensor(x[:2], requires_grad=True)
    weights = torch.tensor(np.random.default_rng(4).standard_normal((2, 4)))
    (model(images) * weights).sum().backward()
    numeric = np.zeros_like(x[:2])
    for index in np.ndindex(numeric.shape):
        shifted = []
        for sign in (1, -1):
            moved = x[:2].copy()
            moved[index] += sign * 1e-6
            with torch.no_grad():
                shifted.append(float((model(torch.tensor(moved)) * weights).sum()))
        numeric[index] = (shifted[0] - shifted[1]) / 2e-6
    np.testing.assert_allclose(images.grad.numpy(), numeric, rtol=1e-5, atol=1e-7)
    assert torch.count_nonzero(images.grad) > 0


def test_classifier_predicts_like_the_simulator(problem):
    network, x, _ = problem
    model = torch_twin.EBMClassifier(network, max_steps=500, tol=1e-9)
    with torch.no_grad():
        logits = model(torch.tensor(x).reshape(6, 3, 4))  # images of any shape are flattened
    np.testing.assert_array_equal(logits.argmax(dim=1).numpy(), relax(network, x, tol=1e-9).predictions())


def test_twin_refuses_unknown_method_and_device(problem):
    network, x, _ = problem
    with pytest.raises(ValueError, match="rk45"):
        torch_twin.relax(network, x, method="rk45")
    with pytest.raises(ValueError, match="unknown torch device"):
        TrainConfig(backend="torch", device="abacus")
    with pytest.raises(ValueError, match="not 'rk45'"):
        TrainConfig(backend="torch", method="rk45")


def test_training_on_the_torch_backend_follows_the_numba_backend():
    """Same trainer, same options: one epoch on either backend ends with the same weights (float64)."""
    from ebm_sim.datasets import load_digits
    from ebm_sim.training import fit, parameters
    data = load_digits()
    trained = []
    for backend in ("numba", "torch"):
        network = Network.init((64, 32, 10), seed=0, dtype=np.float64)
        config = TrainConfig(epochs=1, batch_size=32, lr=2e-3, backend=backend)
        fit(network, data.x_train[:300], data.y_train[:300], data.x_test[:100], data.y_test[:100], config,
            progress=False, log=lambda *_: None)
        trained.append(network)
    for a, b in zip(parameters(trained[0]), parameters(trained[1])):
        np.testing.assert_allclose(b, a, atol=1e-9)
    assert trained[0].history["test_acc"] == trained[1].history["test_acc"]
