"""The fast paths of dense EP training hold to the plain formulas: the fused optimizers against numpy float64, the
contrast of the energy gradients against their difference, and the kernel-level EP step (one input projection for
every phase) against the same step written with the public ``relax``."""
from __future__ import annotations

import numpy as np
import pytest

from ebm_sim.ep import ep_estimate
from ebm_sim.network import Network
from ebm_sim.optimizers import SGD, Adam
from ebm_sim.relax import DivergenceError, relax
from ebm_sim.training import (TrainConfig, energy_parameter_contrast, energy_parameter_gradient, ep_gradient,
                              one_hot)


def _reference_adam(p, grads, rate, betas, eps, decay, steps, scales):
    p = p.astype(np.float64)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, (g, scale) in enumerate(zip(grads, scales), start=1):
        g = g + decay * p
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        p = p - scale * rate / (1 - betas[0] ** t) * m / (np.sqrt(v / (1 - betas[1] ** t)) + eps)
    return p


@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-6), (np.float64, 1e-13)])
def test_fused_adam_is_pytorch_adam(dtype, tol):
    rng = np.random.default_rng(0)
    start = rng.normal(size=(37, 11)).astype(dtype)
    grads = [rng.normal(size=(37, 11)).astype(dtype) for _ in range(5)]
    scales = [1.0, 0.9, 0.5, 0.5, 0.1]
    p = start.copy()
    optimizer = Adam([p], [1e-2], weight_decay=1e-3)
    for g, scale in zip(grads, scales):
        optimizer.step([p], [g], scale)
    assert optimizer.first[0].dtype == dtype and p.dtype == dtype
    expected = _reference_adam(start, [g.astype(np.float64) for g in grads], 1e-2, (0.9, 0.999), 1e-8, 1e-3, 5,
                               scales)
    np.testing.assert_allclose(p, expected, rtol=0, atol=tol * 10)


def test_fused_sgd_is_pytorch_sgd():
    rng = np.random.default_rng(1)
    start = rng.normal(size=(50,)).astype(np.float64)
    grads = [rng.normal(size=(50,)) for _ in range(4)]
    p = start.copy()
    optimizer = SGD([p], [0.1], momentum=0.9, weight_decay=0.01)
    for g in grads:
        optimizer.step([p], [g], 0.5)
    q, v = start.copy(), np.zeros(50)
    for g in grads:
        v = 0.9 * v + g + 0.01 * q
        q = q - 0.05 * v
    np.testing.assert_allclose(p, q, rtol=0, atol=1e-14)


def test_adam_resumes_from_float64_moments_of_an_older_checkpoint():
    rng = np.random.default_rng(2)
    p = rng.normal(size=(8, 3)).astype(np.float32)
    old = {"count": np.int64(3), "first_0": rng.normal(size=(8, 3)), "second_0": rng.random((8, 3))}
    optimizer = Adam([p], [1e-3])
    optimizer.load(old)
    g = rng.normal(size=(8, 3)).astype(np.float32)
    expected = p.astype(np.float64)
    m = 0.9 * old["first_0"] + 0.1 * g
    v = 0.999 * old["second_0"] + 0.001 * g.astype(np.float64) ** 2
    expected -= 1e-3 / (1 - 0.9 ** 4) * m / (np.sqrt(v / (1 - 0.999 ** 4)) + 1e-8)
    optimizer.step([p], [g])
    assert optimizer.first[0].dtype == np.float64
    np.testing.assert_allclose(p, expected, rtol=0, atol=1e-6)


def test_a_gradient_of_the_wrong_size_is_refused():
    p = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="a gradient of 5 values for a parameter of 12"):
        Adam([p], [1e-3]).step([p], [np.zeros(5)])


def _batch(sizes=(12, 9, 7, 4), batch=6, seed=0):
    network = Network.init(sizes, seed=seed, dtype=np.float64, gain=1.5)
    rng = np.random.default_rng(seed)
    x = rng.random((batch, sizes[0]))
    target = one_hot(rng.integers(0, sizes[-1], batch), sizes[-1], np.float64)
    return network, x, target


def test_energy_contrast_is_the_difference_of_the_gradients():
    network, x, target = _batch()
    high = relax(network, x, max_steps=20, beta=0.5, target=target).states
    low = relax(network, x, max_steps=20).states
    contrast = energy_parameter_contrast(x, high, low)
    expected = [h - l for h, l in zip(energy_parameter_gradient(x, high), energy_parameter_gradient(x, low))]
    for c, e in zip(contrast, expected):
        np.testing.assert_allclose(c, e, rtol=0, atol=1e-14)


@pytest.mark.parametrize("nudging", ["symmetric", "positive"])
@pytest.mark.parametrize("readout", [False, True])
def test_kernel_level_ep_step_equals_the_public_relax(nudging, readout):
    network = Network.init((12, 9, 7, 4), seed=3, dtype=np.float64, gain=1.5, readout=readout)
    rng = np.random.default_rng(3)
    x = rng.random((6, 12))
    target = one_hot(rng.integers(0, 4, 6), 4, np.float64)
    config = TrainConfig(nudging=nudging, beta=0.3, free_steps=25, nudged_steps=8, tol=1e-6,
                         cost="cross_entropy" if readout else "mse")
    step = ep_gradient(network, x, target, config, sign=-1.0)

    def relax_phase(beta, initial):
        steps = config.free_steps if initial is None else config.nudged_steps
        return relax(network, x, tol=config.tol, max_steps=steps, beta=beta, target=target if beta else None,
                     initial=initial)

    def readout_gradient(free):
        from ebm_sim.model.cost import readout_parameter_gradient
        return readout_parameter_gradient(*network.readout_layer(), free.states[-1], target)

    expected = ep_estimate(relax_phase, lambda states: energy_parameter_gradient(x, states), config.beta,
                           nudging, -1.0, readout_gradient if readout else None)
    for g, e in zip(step.gradient, expected.gradient):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(step.free_steps, expected.free_steps)
    assert step.nudged_steps == expected.nudged_steps


def test_ep_step_with_rows_split_over_threads_equals_one_thread(monkeypatch):
    """A minibatch of 64 rows relaxes in two worker threads (MIN_ROWS_PER_SHARD 32) where the machine has two cores,
    and in one where it is told to: the same estimate (each sample relaxes alone; the products are over the whole
    minibatch either way)."""
    from ebm_sim import numba_backend, training

    network = Network.init((12, 9, 7, 4), seed=5, dtype=np.float64, gain=1.5)
    rng = np.random.default_rng(5)
    x = rng.random((64, 12))
    target = one_hot(rng.integers(0, 4, 64), 4, np.float64)
    config = TrainConfig(nudging="symmetric", beta=0.3, free_steps=25, nudged_steps=8, tol=1e-6)
    used = []
    original = numba_backend.worker_count
    monkeypatch.setattr(numba_backend, "worker_count",
                        lambda batch, threads, min_rows=32: used.append(original(batch, 2, min_rows)) or used[-1])
    split = ep_gradient(network, x, target, config)
    assert used and set(used) == {2}  # every phase in two threads of 32 rows
    monkeypatch.setattr(training, "MIN_ROWS_PER_SHARD", 10 ** 6)
    used.clear()
    whole = ep_gradient(network, x, target, config)
    assert used and set(used) == {1}
    for a, b in zip(split.gradient, whole.gradient):  # (equal here; a BLAS may block 32 and 64 rows differently)
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(split.free_steps, whole.free_steps)
    for a, b in zip(split.free_states, whole.free_states):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_kernel_level_ep_step_checks_shapes_and_divergence():
    network, x, target = _batch()
    with pytest.raises(ValueError, match=r"needs x \(B, 12\) and target \(B, 4\)"):
        ep_gradient(network, x[:, :5], target, TrainConfig())
    network.weights[0][:] = np.nan
    with pytest.raises(DivergenceError, match="NaN or inf for 6 of 6 samples"):
        ep_gradient(network, x, target, TrainConfig())
