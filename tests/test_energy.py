"""The Hopfield energy and its gradient (ebm_sim.energy), and the energy's descent along the dynamics.

The energy of a network with activation rho(u) = clip(a u, 0, 1), written with one block matrix over the
packed state s = (s_1, ..., s_L) (N units):
    E(s) = |s|^2 / (2a) - s^T A s - c^T s + beta/2 |s_L - y|^2
where A holds W_k in block (layer k+1, layer k) for k >= 1 and c = (W_0 x + b_1, b_2, ..., b_L).
The helpers below build A and c directly from the weights, independently of ebm_sim.energy.
"""
import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from ebm_sim import energy as E
from ebm_sim.network import ACTIVATIONS, Network
from ebm_sim.relax import relax

ACTIVATION_NAMES = sorted(ACTIVATIONS)


def _offsets(network):
    return np.concatenate([[0], np.cumsum(network.layer_sizes[1:])])


def _coupling_matrix(network):
    """A (N, N): W_k in the block (layer k+1, layer k), for the state layers k = 1..L-1."""
    off = _offsets(network)
    A = np.zeros((off[-1], off[-1]))
    for k in range(1, network.num_layers):  # W_k connects s_k (rows off[k-1]:off[k]) to s_{k+1}
        A[off[k]:off[k + 1], off[k - 1]:off[k]] = network.weights[k]
    return A


def _linear_term(network, x):
    """c (B, N): W_0 x + b_1 on layer 1, b_k on the others."""
    first = x @ network.weights[0].T.astype(np.float64) + network.biases[0]
    rest = [np.broadcast_to(b, (x.shape[0], b.shape[0])) for b in network.biases[1:]]
    return np.concatenate([first] + rest, axis=1)


def _energy_independent(network, x, states, beta, target):
    a = network.slope
    s = np.concatenate(states, axis=1).astype(np.float64)
    A = _coupling_matrix(network)
    e = np.sum(s * s, axis=1) / (2 * a) - np.einsum("bi,ij,bj->b", s, A, s) - np.sum(_linear_term(network, x) * s,
                                                                                     axis=1)
    if beta != 0.0:
        e += 0.5 * beta * np.sum((states[-1] - target) ** 2, axis=1)
    return e


def _case(sizes, seed, activation="hard_sigmoid", gain=1.0, batch=3, dtype=np.float64):
    net = Network.init(sizes, seed=seed, dtype=dtype, activation=activation, gain=gain)
    rng = np.random.default_rng(seed + 1000)
    x = rng.uniform(size=(batch, sizes[0]))
    target = rng.uniform(size=(batch, sizes[-1]))
    states = [rng.uniform(size=(batch, n)) for n in sizes[1:]]
    return net, x, target, states


# ------------------------------------------------------------------------------------------ the formula


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize("beta", [0.0, 0.7, -0.4])
@pytest.mark.parametrize("sizes", [(4, 3), (5, 4, 3), (6, 5, 4, 3)])
def test_energy_matches_block_matrix_formula(sizes, beta, activation):
    net, x, target, states = _case(sizes, seed=len(sizes), activation=activation)
    expected = _energy_independent(net, x, states, beta, target)
    got = E.energy(net, x, states, beta, target)
    assert got.shape == (x.shape[0],)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize("beta", [0.0, 0.7, -0.4])
@pytest.mark.parametrize("sizes", [(4, 3), (5, 4, 3), (6, 5, 4, 3)])
def test_energy_gradient_matches_central_differences(sizes, beta, activation):
    net, x, target, states = _case(sizes, seed=10 + len(sizes), activation=activation)
    grad = E.energy_gradient(net, x, states, beta, target)
    assert [g.shape for g in grad] == [s.shape for s in states]
    eps = 1e-5
    for k, s in enumerate(states):
        numeric = np.zeros_like(s)
        for j in range(s.shape[1]):
            plus = [t.copy() for t in states]
            minus = [t.copy() for t in states]
            plus[k][:, j] += eps
            minus[k][:, j] -= eps
            numeric[:, j] = (E.energy(net, x, plus, beta, target) - E.energy(net, x, minus, beta, target)) / (2 * eps)
        # E is quadratic in s, so the central difference is exact up to rounding (~1e-16 |E| / eps).
        np.testing.assert_allclose(grad[k], numeric, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_velocity_is_minus_a_times_gradient_and_fields_are_dphi(beta, activation):
    net, x, target, states = _case((6, 5, 4, 3), seed=3, activation=activation)
    a = net.slope
    grad = E.energy_gradient(net, x, states, beta, target)
    vel = E.velocity(net, x, states, beta, target)
    for g, v in zip(grad, vel):
        np.testing.assert_allclose(v, -a * g, rtol=1e-13, atol=1e-13)
    # h = dPhi/ds = (A + A^T) s + c, nudged on the output
    s = np.concatenate(states, axis=1)
    A = _coupling_matrix(net)
    h = s @ (A + A.T).T + _linear_term(net, x)
    off = _offsets(net)
    if beta:
        h[:, off[-2]:] -= beta * (states[-1] - target)
    np.testing.assert_allclose(np.concatenate(E.local_fields(net, x, states, beta, target), axis=1), h,
                               rtol=1e-13, atol=1e-13)


def test_energy_needs_target_when_nudged():
    net, x, _, states = _case((4, 3), seed=0)
    with pytest.raises(ValueError, match="needs a target"):
        E.energy(net, x, states, beta=0.5)


def test_projected_velocity_blocks_only_outward_components():
    s = [np.array([[0.0, 0.0, 1.0, 1.0, 0.5, 0.5]])]
    v = [np.array([[-1.0, 1.0, 1.0, -1.0, -2.0, 2.0]])]
    out = E.projected_velocity(s, v)[0]
    np.testing.assert_array_equal(out, [[0.0, 1.0, 0.0, -1.0, -2.0, 2.0]])
    np.testing.assert_array_equal(E.max_abs([out, np.array([[-3.0]])]), [3.0])


# ------------------------------------------------------------------------------------------ minimum over the box


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
def test_relaxed_state_minimizes_a_convex_energy_over_the_box(activation):
    """With small weights the Hessian I/a - (A + A^T) is positive definite, so E has one minimizer over [0, 1]^N,
    and it is the fixed point of the projected dynamics: no point of the box has a lower energy."""
    net, x, target, _ = _case((6, 5, 4, 3), seed=5, activation=activation, gain=0.5)
    A = _coupling_matrix(net)
    assert np.linalg.eigvalsh(np.eye(A.shape[0]) / net.slope - (A + A.T)).min() > 0  # convex
    result = relax(net, x, method="fixed_point", tol=1e-12, max_steps=10_000, beta=0.3, target=target,
                   backend="numpy")
    assert result.converged.all()
    e_star = E.energy(net, x, result.states, 0.3, target)
    rng = np.random.default_rng(0)
    for _ in range(50):
        scale = rng.choice([1e-3, 1e-1, 1.0])
        other = [np.clip(s + scale * rng.standard_normal(s.shape), 0.0, 1.0) for s in result.states]
        assert np.all(E.energy(net, x, other, 0.3, target) >= e_star - 1e-12)


# ------------------------------------------------------------------------------------------ descent along Euler
#
# Why the energy cannot increase along projected Euler with a small step. The update is
#     s+ = P(s + dt (a h - s)) = P(s - eta grad E(s)),   eta = dt * a,   P = projection onto the box [0, 1]^N,
# i.e. projected gradient descent on E with step eta. E is quadratic with Hessian I/a - (A + A^T) + beta P_out,
# so grad E is Lipschitz with constant L <= 1/a + ||A + A^T||_2 + max(beta, 0). Two standard facts give
#     E(s+) <= E(s) + <grad E(s), s+ - s> + L/2 |s+ - s|^2          (descent lemma)
#     <grad E(s), s+ - s> <= -|s+ - s|^2 / eta                       (s+ is the projection of s - eta grad E)
# hence E(s+) <= E(s) - (1/eta - L/2) |s+ - s|^2, a decrease whenever eta L < 2. The test takes
# dt <= 1 / (a L) (eta L <= 1), so every step must lower E by at least |s+ - s|^2 / (2 eta), whatever the
# weights' scale (large gains saturate states at 0 and 1; the projection keeps the argument valid).
# Retired samples keep their state, so their energy is constant.


@st.composite
def euler_cases(draw):
    depth = draw(st.integers(1, 3))
    sizes = tuple(draw(st.lists(st.integers(1, 6), min_size=depth + 1, max_size=depth + 1)))
    return dict(
        sizes=sizes,
        seed=draw(st.integers(0, 2 ** 32 - 1)),
        gain=draw(st.one_of(st.sampled_from([0.2, 1.0, 5.0, 30.0]), st.floats(0.05, 40.0))),
        activation=draw(st.sampled_from(ACTIVATION_NAMES)),
        batch=draw(st.integers(1, 4)),
        beta=draw(st.one_of(st.just(0.0), st.floats(0.01, 2.0))),
        dt=draw(st.floats(0.005, 0.1)),
        random_initial=draw(st.booleans()),
        backend=draw(st.sampled_from(["numba", "numpy"])),
    )


@hsettings(max_examples=30, deadline=None)
@given(euler_cases())
def test_energy_never_increases_along_small_step_euler(case):
    net = Network.init(case["sizes"], seed=case["seed"], dtype=np.float64, activation=case["activation"],
                       gain=case["gain"])
    rng = np.random.default_rng(case["seed"])
    batch, beta = case["batch"], case["beta"]
    x = rng.uniform(size=(batch, net.layer_sizes[0]))
    target = rng.uniform(size=(batch, net.layer_sizes[-1])) if beta else None
    initial = [rng.uniform(size=(batch, n)) for n in net.layer_sizes[1:]] if case["random_initial"] else None
    a = net.slope
    A = _coupling_matrix(net)
    lipschitz = 1 / a + np.linalg.norm(A + A.T, 2) + max(beta, 0.0)
    dt = min(case["dt"], 1.0 / (a * lipschitz))
    eta = dt * a

    result = relax(net, x, method="euler", dt=dt, tol=1e-9, max_steps=150, beta=beta, target=target,
                   record=True, initial=initial, backend=case["backend"])

    energy = result.energy
    frames = result.trajectory[0].shape[0]
    assert energy.shape == (frames, batch)
    assert np.all(np.isfinite(energy))
    scale = 1.0 + np.abs(energy).max()
    increase = np.diff(energy, axis=0)
    assert np.all(increase <= 1e-9 * scale), f"energy rose by {increase.max():.3g} (dt={dt:.3g})"
    # sufficient decrease: E(s+) - E(s) <= -|s+ - s|^2 / (2 eta)
    packed = np.concatenate(result.trajectory, axis=2)
    moved = np.sum(np.diff(packed, axis=0) ** 2, axis=2)
    assert np.all(increase <= -moved / (2 * eta) + 1e-9 * scale)
