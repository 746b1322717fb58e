"""Layered networks as layers and interactions (ebm_sim.model): the interactions' algebra, the numpy reference
against torch and against autograd, the dense special case against ebm_sim.energy, energy descent, and EP.

Small convolutional cases cover max pooling, average pooling, stride 2, zero padding and a dropped odd row/column.
"""
import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from ebm_sim import energy as dense_energy
from ebm_sim.model import Conv2d, Dense, LayeredNetwork, implementation
from ebm_sim.model import energy as E
from ebm_sim.model.dynamics import relax
from ebm_sim.model.ep import ep_gradient
from ebm_sim.network import Network

torch = pytest.importorskip("torch")

CASES = {
    "maxpool+avgpool": "2x6x6, conv 3 k3 p1 maxpool, conv 4 k3 p1 avgpool, 5",
    "stride2+maxpool": "2x10x10, conv 3 k3 s2 p1 maxpool, conv 4 k2, readout 4",
    "stride2+readout": "2x9x9, conv 3 k3 s2 p1, conv 4 k2 s2, readout 3",
    "dense-on-conv": "1x5x5, conv 2 k2 maxpool, 6, 3",
}


def case(name, seed=0, batch=3, gain=1.0, activation="hard_sigmoid"):
    net = LayeredNetwork.init(CASES[name], seed=seed, dtype=np.float64, gain=gain, activation=activation)
    rng = np.random.default_rng(seed + 7)
    x = rng.uniform(size=(batch,) + net.input_shape)
    states = [rng.uniform(size=(batch,) + shape) for shape in net.state_shapes]
    target = np.eye(net.num_classes)[rng.integers(0, net.num_classes, batch)]
    return net, x, states, target


def binary(net):
    return [i for i in net.interactions if not i.unary]


# ------------------------------------------------------------------------------------------ algebra
@pytest.mark.parametrize("name", sorted(CASES))
def test_pre_field_is_the_adjoint_of_the_post_field(name):
    """<A x, y> = <x, A^T y> for every binary interaction, max pooling with the routing of the point x."""
    net, x, states, _ = case(name)
    every = [x] + states
    rng = np.random.default_rng(1)
    for i in binary(net):
        impl = implementation(i.kind, "numpy")
        pre = rng.standard_normal(every[i.pre].shape)
        post = rng.standard_normal(every[i.post].shape)
        left = np.sum(impl.post_field(i, i.params, pre) * post)
        right = np.sum(pre * impl.pre_field(i, i.params, pre, post))
        assert left == pytest.approx(right, rel=1e-12), i.describe()


def test_conv_reference_is_a_direct_loop():
    """The im2col convolution equals the textbook sum, with stride and padding; max-unpooling routes to the first
    maximum of each 2x2 window."""
    rng = np.random.default_rng(0)
    i = Conv2d(0, 1, kernel=3, stride=2, padding=1)
    weight = rng.standard_normal((2, 3, 3, 3))
    s = rng.standard_normal((1, 3, 7, 6))
    got = implementation("conv2d", "numpy").post_field(i, {"weight": weight}, s)
    padded = np.pad(s, ((0, 0), (0, 0), (1, 1), (1, 1)))
    expected = np.zeros((1, 2, 4, 3))
    for o in range(2):
        for h in range(4):
            for w in range(3):
                expected[0, o, h, w] = np.sum(padded[0, :, 2 * h:2 * h + 3, 2 * w:2 * w + 3] * weight[o])
    np.testing.assert_allclose(got, expected, rtol=1e-12)

    pooled = Conv2d(0, 1, kernel=1, pool="max")
    ones = {"weight": np.ones((1, 1, 1, 1))}
    u = np.array([[[[1.0, 3.0, 0.0], [3.0, 2.0, 5.0], [9.0, 9.0, 9.0]]]])  # odd row/column dropped; tie -> first
    impl = implementation("conv2d", "numpy")
    np.testing.assert_array_equal(impl.post_field(pooled, ones, u), [[[[3.0]]]])
    np.testing.assert_array_equal(impl.pre_field(pooled, ones, u, np.array([[[[7.0]]]])),
                                  [[[[0.0, 7.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]])


# ------------------------------------------------------------------------------------------ torch = numpy = autograd
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("beta", [0.0, 0.6])
def test_torch_matches_numpy_fields_energy_and_gradients(name, beta):
    net, x, states, target = case(name)
    tp = E.parameters(net, "torch")
    tx, ts, tt = torch.tensor(x), [torch.tensor(s) for s in states], torch.tensor(target)
    for got, want in zip(E.local_fields(net, tx, ts, beta, tt, tp), E.local_fields(net, x, states, beta, target)):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(E.energy(net, tx, ts, beta, tt, tp).numpy(), E.energy(net, x, states, beta, target),
                               rtol=1e-12)
    for got, want in zip(E.parameter_gradient(net, tx, ts, tp), E.parameter_gradient(net, x, states)):
        for key in want:
            np.testing.assert_allclose(got[key].numpy(), want[key], rtol=1e-11, atol=1e-12)
    got = E.cost_parameter_gradient(net, ts, tt, tp)
    for key, want in E.cost_parameter_gradient(net, states, target).items():
        np.testing.assert_allclose(got[key].numpy(), want, rtol=1e-12)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fields_and_parameter_gradients_are_derivatives_of_phi(name):
    """Autograd of Phi (torch) gives the fields dPhi/ds and the parameter gradients dPhi/dtheta: the slow, obvious
    check of the hand-written transposes, unpooling and weight correlations."""
    net, x, states, target = case(name)
    tp = E.parameters(net, "torch", requires_grad=True)
    ts = [torch.tensor(s, requires_grad=True) for s in states]
    beta = 0.3
    phi = E.primitive(net, torch.tensor(x), ts, beta, torch.tensor(target), tp).sum()
    phi.backward()
    for s, h in zip(ts, E.local_fields(net, x, states, beta, target)):
        np.testing.assert_allclose(s.grad.numpy(), h, rtol=1e-10, atol=1e-12)
    batch = x.shape[0]
    for p, g in zip(tp.interactions, E.parameter_gradient(net, x, states)):
        for key in g:
            np.testing.assert_allclose(p[key].grad.numpy() / batch, g[key], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("method", ["euler", "fixed_point", "alternating"])
def test_torch_relaxation_matches_numpy_states_and_per_sample_steps(name, method):
    net, x, _, _ = case(name, batch=5, gain=0.8)
    want = relax(net, x, method, tol=1e-7, max_steps=200)
    got = relax(net, torch.tensor(x), method, tol=1e-7, max_steps=200, params=E.parameters(net, "torch"))
    np.testing.assert_array_equal(got.steps.numpy(), want.steps)
    for g, w in zip(got.states, want.states):
        np.testing.assert_allclose(g.numpy(), w, rtol=0, atol=1e-10)
    assert want.converged.all() and want.steps.min() > 1
    np.testing.assert_array_equal(np.clip(want.output_update, 0, 1), want.states[-1])


# ------------------------------------------------------------------------------------------ the dense special case
@pytest.mark.parametrize("readout", [False, True])
def test_dense_network_as_interactions_is_the_same_network(readout):
    sizes = (7, 5, 4, 3)
    dense = Network.init(sizes, seed=3, dtype=np.float64, readout=readout)
    layered = LayeredNetwork.from_dense(dense)
    spec = ",".join(map(str, sizes[:-1])) + (f", readout {sizes[-1]}" if readout else f", {sizes[-1]}")
    same_draws = LayeredNetwork.init(spec, seed=3, dtype=np.float64)
    for a, b in zip(layered.parameter_arrays(), same_draws.parameter_arrays()):
        np.testing.assert_array_equal(a, b)  # the spec's initialization draws what Network.init draws
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(4, sizes[0]))
    states = [rng.uniform(size=(4, n)) for n in dense.state_sizes]
    y = np.eye(sizes[-1])[[0, 1, 2, 0]]
    for beta in (0.0, 0.4):
        for got, want in zip(E.local_fields(layered, x, states, beta, y),
                             dense_energy.local_fields(dense, x, states, beta, y)):
            np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(E.energy(layered, x, states, beta, y),
                                   dense_energy.energy(dense, x, states, beta, y), rtol=1e-12)
    from ebm_sim.relax import relax as dense_relax
    want = dense_relax(dense, x, method="alternating", tol=1e-8, max_steps=300, backend="numpy")
    got = relax(layered, x, "alternating", tol=1e-8, max_steps=300)
    np.testing.assert_array_equal(got.steps, want.steps)
    for g, w in zip(got.states, want.states):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------ energy descent
def coupling_norm_bound(net):
    """An upper bound on ||A + A^T||_2 for the coupling operator A of any max-pool routing: 2 max_k ||A_k||, with
    ||A_k|| <= ||conv_k|| (pooling selects or averages) estimated by power iteration (x 1.05 for safety)."""
    rng = np.random.default_rng(0)
    norms = []
    for i in binary(net):
        if isinstance(i, Dense):
            norms.append(np.linalg.norm(i.params["weight"], 2))
            continue
        plain = Conv2d(i.pre, i.post, kernel=i.kernel, stride=i.stride, padding=i.padding)
        impl = implementation("conv2d", "numpy")
        v = rng.standard_normal((1,) + net.layer_shapes[i.pre])
        for _ in range(60):
            u = impl.post_field(plain, i.params, v)
            v = impl.pre_field(plain, i.params, v, u)
            norm = np.sqrt(np.linalg.norm(v))
            v /= np.linalg.norm(v)
        norms.append(1.05 * norm)
    return 2 * max(norms)


@hsettings(max_examples=20, deadline=None)
@given(name=st.sampled_from(sorted(CASES)), seed=st.integers(0, 2 ** 31), gain=st.sampled_from([0.3, 1.0, 4.0]),
       beta=st.sampled_from([0.0, 0.5]), activation=st.sampled_from(["hard_sigmoid", "hard_sigmoid_half"]),
       random_initial=st.booleans())
def test_energy_never_increases_along_small_step_projected_euler(name, seed, gain, beta, activation,
                                                                  random_initial):
    """Projected Euler is projected gradient descent on E with step eta = dt a; E(s) <= E_r(s') for the quadratic
    E_r that fixes the max-pool routing at s (a max is >= any of its entries, states are >= 0), so the descent lemma
    with E_r's Lipschitz constant L <= 1/a + ||A + A^T|| + beta L_C gives a decrease whenever eta L <= 1."""
    net, x, states, target = case(name, seed=seed % 1000, gain=gain, activation=activation)
    a = net.slope
    readout = net.cost.params.get("weight")
    cost_curvature = 1.0 if readout is None else 0.5 * np.linalg.norm(readout, 2) ** 2
    lipschitz = 1 / a + coupling_norm_bound(net) + beta * cost_curvature
    dt = min(0.1, 1.0 / (a * lipschitz))
    current = states if random_initial else net.zero_states(x.shape[0])
    previous = E.energy(net, x, current, beta, target)
    for _ in range(40):
        result = relax(net, x, "euler", tol=0.0, max_steps=1, dt=dt, beta=beta, target=target, initial=current)
        now = E.energy(net, x, result.states, beta, target)
        moved = sum(np.sum((n - c) ** 2, axis=tuple(range(1, n.ndim))) for n, c in zip(result.states, current))
        assert np.all(now - previous <= -moved / (2 * dt * a) + 1e-10 * (1 + np.abs(previous))), (now - previous)
        current, previous = result.states, now


# ------------------------------------------------------------------------------------------ EP
def loss(net, x, target, tol=1e-13):
    free = relax(net, x, "fixed_point", tol=tol, max_steps=20_000)
    assert free.converged.all()
    return float(np.mean(E.cost_value(net, free.states, target))), free


def directional_derivative(net, x, target, which, key, direction, eps=1e-6):
    values = []
    for sign in (1, -1):
        moved = net.copy()
        if which == "cost":
            moved.cost.params[key] = moved.cost.params[key] + sign * eps * direction
        else:
            moved.interactions[which].params[key] = moved.interactions[which].params[key] + sign * eps * direction
        values.append(loss(moved, x, target)[0])
    return (values[0] - values[1]) / (2 * eps)


@pytest.mark.parametrize("name", ["maxpool+avgpool", "stride2+readout"])
def test_symmetric_ep_matches_the_loss_gradient_to_order_beta_squared(name):
    """EP (symmetric nudging, converged phases) against central finite differences of L(theta) = mean C(s*(theta))
    along a random direction per parameter: the error shrinks ~4x when beta halves (O(beta^2)). beta stays below
    the nudge at which a unit crosses the box's boundary (at beta = 0.02 one does in "stride2+readout": 23 % error,
    then 3e-7 at 0.01): across a kink the loss is only piecewise smooth."""
    net, x, _, target = case(name, seed=2, batch=4, gain=0.6)
    rng = np.random.default_rng(3)
    checks = [(k, key) for k, i in enumerate(net.interactions) for key in i.params] + \
             [("cost", key) for key in net.cost.params]
    directions, truth = {}, {}
    for which, key in checks:
        array = net.cost.params[key] if which == "cost" else net.interactions[which].params[key]
        directions[which, key] = rng.standard_normal(array.shape)
        truth[which, key] = directional_derivative(net, x, target, which, key, directions[which, key])
    errors = {}
    for beta in (0.01, 0.005):
        step = ep_gradient(net, x, target, beta=beta, free_steps=20_000, nudged_steps=20_000, tol=1e-13)
        worst = 0.0
        for which, key in checks:
            g = step.cost[key] if which == "cost" else step.interactions[which][key]
            estimate = float(np.sum(g * directions[which, key]))
            worst = max(worst, abs(estimate - truth[which, key]) / max(abs(truth[which, key]), 1e-8))
        errors[beta] = worst
    assert errors[0.005] < 1e-4, errors
    assert errors[0.01] / errors[0.005] > 3.0, errors  # second order: ~4


@pytest.mark.parametrize("name", ["maxpool+avgpool", "stride2+maxpool"])
def test_ep_after_k_nudged_steps_equals_bptt_through_k_steps(name):
    """Discrete-time EP = truncated BPTT (Ernoult et al. 2019): K one-sided nudged steps from the free fixed point
    s*, beta -> 0, give the gradient of C(s_K) backpropagated through K free steps started at s*."""
    net, x, _, target = case(name, seed=4, batch=3, gain=0.6)
    _, free = loss(net, x, target)
    for K in (1, 3, 6):
        tp = E.parameters(net, "torch", requires_grad=True)
        run = relax(net, torch.tensor(x), "fixed_point", tol=0.0, max_steps=K, params=tp,
                    initial=[torch.tensor(s) for s in free.states])
        E.cost_value(net, run.states, torch.tensor(target), tp).mean().backward()
        step = ep_gradient(net, x, target, beta=1e-6, free_steps=1000, nudged_steps=K, nudging="positive",
                           tol=0.0)
        for p, g in zip(tp.interactions, step.interactions):
            for key in g:
                bptt = np.zeros_like(g[key]) if p[key].grad is None else p[key].grad.numpy()  # beyond K steps' reach
                np.testing.assert_allclose(g[key], bptt, rtol=1e-4, atol=1e-8)


# ------------------------------------------------------------------------------------------ every integrator
@pytest.mark.parametrize("name", ["maxpool+avgpool", "stride2+readout"])
def test_every_integrator_reaches_the_same_fixed_point_on_conv_networks(name):
    """euler, fixed_point, alternating, rk45 and solve_ivp (scipy, per sample) agree on a contracting conv network."""
    net, x, _, _ = case(name, seed=5, batch=2, gain=0.5)
    reference = relax(net, x, "fixed_point", tol=1e-10, max_steps=5000)
    assert reference.converged.all()
    for method, tol in (("euler", 1e-8), ("alternating", 1e-10), ("rk45", 1e-8), ("solve_ivp", 1e-7)):
        result = relax(net, x, method, tol=tol, max_steps=5000)
        assert result.converged.all(), method
        for got, want in zip(result.states, reference.states):
            np.testing.assert_allclose(got, want, atol=1e-6, err_msg=method)


def test_layered_rk45_is_the_dense_reference_rk45():
    from ebm_sim.relax import relax as dense_relax

    dense = Network.init((6, 5, 4, 3), seed=1, dtype=np.float64)
    x = np.random.default_rng(2).uniform(size=(3, 6))
    want = dense_relax(dense, x, method="rk45", tol=1e-7, max_steps=500, backend="numpy")
    got = relax(LayeredNetwork.from_dense(dense), x, "rk45", tol=1e-7, max_steps=500)
    np.testing.assert_array_equal(got.steps, want.steps)
    for g, w in zip(got.states, want.states):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-13)


# ------------------------------------------------------------------------------------------ the forward memo
@pytest.mark.parametrize("backend", ["numpy", "numba", "torch"])
@pytest.mark.parametrize("method", ["fixed_point", "alternating"])
def test_a_relaxation_reuses_each_convolution_of_an_unchanged_state(backend, method, monkeypatch):
    """relax keeps each interaction's last forward (conv(s_pre), its max-pool routing) while s_pre is the same array:
    alternating updates convolve each relaxing pre layer once per step instead of twice (post field, then the
    routing of its own pre field), with exactly the states of the calls without the memo."""
    from ebm_sim.model import dynamics, numba_ops, numpy_ops, torch_ops
    net = LayeredNetwork.init("1x8x8, conv 2 k3 p1 maxpool, conv 3 k3 p1 maxpool, 4", seed=0, dtype=np.float64,
                              gain=0.8)
    x = np.random.default_rng(0).uniform(size=(4,) + net.input_shape)
    params = E.parameters(net, backend)
    x = torch.tensor(x) if backend == "torch" else x
    owner, name = {"numpy": (numpy_ops, "conv"), "torch": (torch_ops, "conv"),
                   "numba": (numba_ops.ConvCall, "convolve")}[backend]
    convolutions = [0]

    def counted(*args, _real=getattr(owner, name), **kwargs):
        convolutions[0] += 1
        return _real(*args, **kwargs)
    monkeypatch.setattr(owner, name, counted)
    steps = 12
    with_memo = relax(net, x, method, tol=0.0, max_steps=steps, params=params)
    alternating = method == "alternating"  # (its first half-step routes s_1's pre field before any forward)
    assert convolutions[0] == 1 + steps + alternating  # conv(x) once (clamped), conv(s_1) once per step
    real_step = dynamics._step
    monkeypatch.setattr(dynamics, "_step", lambda *args: real_step(*args[:11]))  # memo=None
    convolutions[0] = 0
    without = relax(net, x, method, tol=0.0, max_steps=steps, params=params)
    assert convolutions[0] == 1 + steps * (2 if alternating else 1)
    for a, b in zip(with_memo.states, without.states):
        a, b = (a.numpy(), b.numpy()) if backend == "torch" else (a, b)
        np.testing.assert_array_equal(a, b)
