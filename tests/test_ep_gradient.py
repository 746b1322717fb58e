"""Correctness of the EP gradient (ebm_sim.training.ep_gradient), in float64 on small networks.

Notation: packed state s = (s_1, ..., s_L) (N units), slope a (rho(u) = clip(a u, 0, 1)), local field
    h(s; theta) = J s + c(x),   J symmetric: W_k in block (k+1, k) and W_k^T in block (k, k+1), k >= 1,
                                c = (W_0 x + b_1, b_2, ..., b_L),
free fixed point s* = clip(a h(s*)), loss L(theta) = mean over the batch of C(s*_L) with C = 1/2 ||s_L - y||^2.
Every network here has a ||J||_2 < 1, so s -> clip(a h(s)) is a contraction (clip is 1-Lipschitz): the fixed
point is unique and both phases converge from any start.

What is checked:
1. The true dL/dtheta, computed twice independently of the library's gradient code:
   (a) implicit differentiation of F(s, theta) = a h(s; theta) - s = 0 at s*: ds*/dtheta = -(dF/ds)^-1 dF/dtheta
       with dF/ds = a J - I built from the weights, and dF/dtheta = a dh/dtheta built column by column (h is linear
       in theta, so dh/dtheta_p = h(s*; e_p), the field of the network whose only nonzero parameter is theta_p = 1);
       where some units sit at a bound (clip active) the same formula with D = diag(unit strictly inside):
       ds*/dtheta = (I - a D J)^-1 a D dh/dtheta;
   (b) central finite differences of L, each L from ``relax(tol=1e-13)``.
   Then ep_gradient (both methods, "symmetric" and "positive") against it, and the empirical order in beta of the
   error: O(beta) one-sided, O(beta^2) symmetric.
2. Discrete-time EP = truncated BPTT (Ernoult et al. 2019, "gradient descending updates"), see
   ``test_ep_after_k_nudged_steps_equals_truncated_bptt``; for alternating (even/odd) updates, K sweeps of EP equal
   BPTT through 2K or 2K - 1 synchronous steps (``test_alternating_ep_equals_synchronous_bptt_of_about_2k_steps``).
3. A saturating network (units clamped at 0 and at 1 in the free state): EP still equals the true gradient.
"""
from __future__ import annotations

import numpy as np
import pytest

from ebm_sim.network import ACTIVATIONS, Network
from ebm_sim.relax import relax
from ebm_sim.training import TrainConfig, ep_gradient, parameters

torch = pytest.importorskip("torch")

SIZES = (6, 5, 4, 3)
BATCH = 4
RELAX_TOL = 1e-13


# ------------------------------------------------------------------------------------------ problems
def interior_problem(activation="hard_sigmoid", seed=0, sizes=SIZES, batch=BATCH):
    """Weights U(-1, 1)/sqrt(n_in), W_0 scaled by 1/(2a) and the ones between state layers rescaled so that
    a ||J||_2 = 1/2 (a real coupling between layers and a fast contraction), biases 0.5/a + U(-0.1, 0.1): every field
    a h stays well inside (0, 1), checked by ``check_interior``."""
    rng = np.random.default_rng(seed)
    a = ACTIVATIONS[activation]
    weights = [rng.uniform(-1.0, 1.0, size=(m, n)) / np.sqrt(n) for n, m in zip(sizes[:-1], sizes[1:])]
    weights[0] *= 0.5 / a
    biases = [0.5 / a + rng.uniform(-0.1, 0.1, size=m) for m in sizes[1:]]
    net = Network(weights, biases, activation)
    factor = 0.5 / (a * np.linalg.norm(coupling(net), 2))
    net = Network([weights[0]] + [w * factor for w in weights[1:]], biases, activation)
    x = rng.uniform(size=(batch, sizes[0]))
    y = rng.uniform(size=(batch, sizes[-1]))
    return net, x, y


def saturating_problem(activation="hard_sigmoid", seed=1):
    """The interior problem with four biases pushed far out: hidden units clamped at 1 and at 0, an output unit
    clamped at 0 (target > 0, so the nudge pushes it against its bound), the others inside."""
    net, x, y = interior_problem(activation, seed)
    a = net.slope
    net.biases[0][0] = 2.0 / a     # s_1[0] = 1
    net.biases[1][1] = -1.5 / a    # s_2[1] = 0
    net.biases[1][3] = 2.0 / a     # s_2[3] = 1
    net.biases[2][2] = -1.5 / a    # s_3[2] = 0
    y[:, 2] = np.linspace(0.3, 0.9, y.shape[0])
    return net, x, y


# ------------------------------------------------------------------------------------------ independent maths
def offsets(net):
    return np.concatenate([[0], np.cumsum(net.layer_sizes[1:])])


def coupling(net):
    """J (N, N), symmetric: W_k in block (layer k+1, layer k) and W_k^T in block (layer k, layer k+1), k >= 1."""
    off = offsets(net)
    J = np.zeros((off[-1], off[-1]))
    for k in range(1, net.num_layers):
        J[off[k]:off[k + 1], off[k - 1]:off[k]] = net.weights[k]
    return J + J.T


def linear_term(net, x):
    """c (B, N) = (W_0 x + b_1, b_2, ..., b_L)."""
    first = x @ net.weights[0].T + net.biases[0]
    rest = [np.broadcast_to(b, (x.shape[0], b.shape[0])) for b in net.biases[1:]]
    return np.concatenate([first] + rest, axis=1)


def packed_field(net, x, s):
    """h (B, N) = s J + c (J symmetric)."""
    return s @ coupling(net) + linear_term(net, x)


def flatten(arrays):
    return np.concatenate([np.ravel(a) for a in arrays])


def unflatten(vector, like):
    out, start = [], 0
    for a in like:
        out.append(vector[start:start + a.size].reshape(a.shape))
        start += a.size
    return out


def with_parameters(net, vector):
    """A network of the same shape and activation whose parameters [W_0, b_1, W_1, ...] are ``vector``."""
    params = unflatten(vector, parameters(net))
    return Network(params[0::2], params[1::2], net.activation)


def free_fixed_point(net, x, method="fixed_point"):
    result = relax(net, x, method=method, tol=RELAX_TOL, max_steps=100000)
    assert result.converged.all()
    return result.states


def loss(net, x, y, method="fixed_point"):
    """L = mean_b 1/2 ||s*_L - y||^2."""
    s_out = free_fixed_point(net, x, method)[-1]
    return float(np.mean(0.5 * np.sum((s_out - y) ** 2, axis=1)))


def active_mask(s_packed):
    """D (B, N): 1 where a unit is strictly inside (0, 1), 0 where the clip is active."""
    return ((s_packed > 0.0) & (s_packed < 1.0)).astype(np.float64)


def implicit_gradient(net, x, y, states):
    """dL/dtheta by implicit differentiation at the free fixed point (see the module docstring), flat vector in the
    order of ``parameters(net)``: ds*/dtheta = (I - a D J)^-1 a D dh/dtheta, dL/dtheta = mean_b (s*_L - y)^T ds*_L."""
    a = net.slope
    s = np.concatenate(states, axis=1)
    B, N = s.shape
    D = active_mask(s)
    J = coupling(net)
    theta = flatten(parameters(net))
    P = theta.size
    dh = np.empty((B, N, P))                      # dh/dtheta: h is linear in theta
    for p in range(P):
        e = np.zeros(P)
        e[p] = 1.0
        dh[:, :, p] = packed_field(with_parameters(net, e), x, s)
    off = offsets(net)
    grad = np.zeros(P)
    for b in range(B):
        dF_ds = a * D[b][:, None] * J - np.eye(N)          # d/ds [D (a h) + (1 - D) s_bound - s]
        dF_dtheta = a * D[b][:, None] * dh[b]
        ds_dtheta = -np.linalg.solve(dF_ds, dF_dtheta)    # (N, P)
        grad += (s[b, off[-2]:] - y[b]) @ ds_dtheta[off[-2]:]
    return grad / B


def finite_difference_gradient(net, x, y, eps=1e-4, method="fixed_point"):
    theta = flatten(parameters(net))
    grad = np.empty_like(theta)
    for p in range(theta.size):
        up, down = theta.copy(), theta.copy()
        up[p] += eps
        down[p] -= eps
        grad[p] = (loss(with_parameters(net, up), x, y, method) - loss(with_parameters(net, down), x, y, method)) / (
            2 * eps)
    return grad


def rel_err(estimate, truth):
    return float(np.linalg.norm(estimate - truth) / np.linalg.norm(truth))


def ep(net, x, y, beta, nudging="symmetric", method="fixed_point", tol=RELAX_TOL, free_steps=100000,
       nudged_steps=100000):
    config = TrainConfig(nudging=nudging, beta=beta, tol=tol, free_steps=free_steps, nudged_steps=nudged_steps,
                         method=method)
    return ep_gradient(net, x, y, config)


def check_contraction(net):
    assert net.slope * np.linalg.norm(coupling(net), 2) < 0.8


def check_interior(states, margin=0.05):
    s = np.concatenate(states, axis=1)
    assert margin < s.min() and s.max() < 1 - margin, (s.min(), s.max())


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", params=sorted(ACTIVATIONS))
def interior(request):
    """(net, x, y, free states, true gradient) with the true gradient checked two ways."""
    net, x, y = interior_problem(request.param)
    check_contraction(net)
    states = free_fixed_point(net, x)
    check_interior(states)
    # the free state is the solution of the linear system s = a (J s + c) (no clip is active)
    exact = np.linalg.solve(np.eye(coupling(net).shape[0]) - net.slope * coupling(net),
                            net.slope * linear_term(net, x).T).T
    assert np.abs(np.concatenate(states, axis=1) - exact).max() < 1e-12
    implicit = implicit_gradient(net, x, y, states)
    fd = finite_difference_gradient(net, x, y)
    assert rel_err(fd, implicit) < 1e-6, rel_err(fd, implicit)
    assert np.linalg.norm(implicit) > 1e-2     # a non-trivial gradient
    return net, x, y, states, implicit


# ------------------------------------------------------------------------------------------ 1. EP vs dL/dtheta
@pytest.mark.parametrize("method", ["fixed_point", "alternating"])
def test_ep_matches_true_gradient_small_beta(interior, method):
    """Symmetric nudging, beta = 1e-3: the EP estimate is the loss gradient (descent direction, batch mean) to
    O(beta^2) ~ 1e-6 relative; one-sided nudging to O(beta) ~ 1e-3."""
    net, x, y, _, truth = interior
    sym = ep(net, x, y, 1e-3, "symmetric", method)
    pos = ep(net, x, y, 1e-3, "positive", method)
    assert [g.shape for g in sym.gradient] == [p.shape for p in parameters(net)]
    assert rel_err(flatten(sym.gradient), truth) < 1e-5
    assert rel_err(flatten(pos.gradient), truth) < 3e-3
    # one-sided nudging with a negative beta (what "random" draws half of the time) estimates the same gradient
    config = TrainConfig(nudging="random", beta=1e-3, tol=RELAX_TOL, free_steps=100000, nudged_steps=100000,
                         method=method)
    neg = ep_gradient(net, x, y, config, sign=-1.0)
    assert rel_err(flatten(neg.gradient), truth) < 3e-3
    assert rel_err(0.5 * (flatten(neg.gradient) + flatten(pos.gradient)), flatten(sym.gradient)) < 1e-9
    # the sign: a small step against the EP gradient lowers the loss (as the optimizers use it)
    theta = flatten(parameters(net))
    step = 1e-3 * flatten(sym.gradient) / np.linalg.norm(flatten(sym.gradient))
    assert loss(with_parameters(net, theta - step), x, y) < loss(net, x, y) < loss(with_parameters(net, theta + step),
                                                                                  x, y)


@pytest.mark.parametrize("method", ["fixed_point", "alternating"])
@pytest.mark.parametrize("nudging, order", [("positive", 1.0), ("symmetric", 2.0)])
def test_ep_error_order_in_beta(interior, nudging, order, method):
    """Relative error for beta = 0.1, 0.05, 0.025: the log2 ratio per halving is the order of the estimate.
    Every nudged state stays inside (0, 1) for these betas (checked), so the error is the smooth Taylor remainder."""
    net, x, y, _, truth = interior
    betas = [0.1, 0.05, 0.025]
    for beta in (betas[0], -betas[0]):
        nudged = relax(net, x, tol=RELAX_TOL, max_steps=100000, beta=beta, target=y)
        check_interior(nudged.states, margin=0.02)
    errors = [rel_err(flatten(ep(net, x, y, beta, nudging, method).gradient), truth) for beta in betas]
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    print(f"{net.activation} {method} {nudging}: errors {errors}, orders {orders}")
    assert np.all(np.abs(orders - order) < 0.2), (errors, orders)


# ------------------------------------------------------------------------------------------ 2. EP = truncated BPTT
def bptt_gradient(net, x, y, start, K, alternating=False):
    """Plain autograd: K steps of the discrete-time dynamics s <- clip(a dPhi/ds(x, s)) (the fixed-point map,
    synchronous; or even/odd alternating) from ``start`` (a constant), loss mean_b C(s_K), gradient w.r.t. every
    parameter (shared by the K steps). Flat vector in the order of ``parameters(net)``."""
    a = net.slope
    W = [torch.tensor(w, requires_grad=True) for w in net.weights]
    b = [torch.tensor(v, requires_grad=True) for v in net.biases]
    xs = torch.tensor(x)
    s = [torch.tensor(v) for v in start]
    L = net.num_layers

    def field(k, s):            # dPhi/ds_k, k = 0..L-1 (layer k+1)
        below = xs if k == 0 else s[k - 1]
        h = below @ W[k].T + b[k]
        if k < L - 1:
            h = h + s[k + 1] @ W[k + 1]
        return h

    for _ in range(K):
        if alternating:
            for parity in (0, 1):
                s = [torch.clamp(a * field(k, s), 0.0, 1.0) if k % 2 == parity else s[k] for k in range(L)]
        else:
            s = [torch.clamp(a * field(k, s), 0.0, 1.0) for k in range(L)]
    cost = 0.5 * ((s[-1] - torch.tensor(y)) ** 2).sum(dim=1).mean()
    params = [p for pair in zip(W, b) for p in pair]
    grads = torch.autograd.grad(cost, params, allow_unused=True)  # K = 1: W_0 does not reach s_L yet
    return flatten([np.zeros(p.shape) if g is None else g.numpy() for p, g in zip(params, grads)])


@pytest.mark.parametrize("nudging", ["positive", "symmetric"])
def test_ep_after_k_nudged_steps_equals_truncated_bptt(interior, nudging):
    """Ernoult et al. 2019 (GDU property), discrete time, s_{t+1} = clip(a dPhi/ds(x, s_t)), nudged phase
    s_{t+1} = clip(a (dPhi/ds(x, s_t) - beta dC/ds(s_t))) started at the free fixed point s*:

        EP_K = -(1/beta) (dPhi/dtheta(s^beta_K) - dPhi/dtheta(s*))          (ep_gradient, "positive", K steps)
             = (dE/dtheta(s^beta_K) - dE/dtheta(s*)) / beta  ->  BPTT_K  as beta -> 0,

    where BPTT_K is the gradient of mean_b C(s_K) through K steps of the free dynamics started at s* (held
    constant): the BPTT gradient truncated to the last K steps. Linearising both around s* (D = diag(unit inside),
    M = a D J, g = dC/ds*, X = d^2 Phi / dtheta ds):
        EP_K   ->  X sum_{j<K} M^j D a g                    (the nudge enters through the clip, like the field)
        BPTT_K  =  X sum_{j<K} a D (M^T)^j g  =  X sum_{j<K} M^j D a g   (J symmetric, D^2 = D).
    So the convention that makes them equal for every K: one-sided nudging from s* with the nudge inside the
    clip (as in ebm_sim), BPTT loss the batch mean of C at the last step, parameters shared by all steps, s* a
    constant. Symmetric nudging gives the same limit (with an O(beta^2) instead of O(beta) gap). Both tend to the
    true gradient (implicit differentiation) as K grows, geometrically at the contraction rate.
    """
    net, x, y, states, truth = interior
    beta = 1e-4
    errors_ep, errors_truth = [], []
    for K in (1, 2, 3, 5, 10, 30):
        # tol = 1e-300: the free phase stops only at an exact fixed point (change 0), the nudged one after K steps
        step = ep(net, x, y, beta, nudging, tol=1e-300, free_steps=300, nudged_steps=K)
        assert step.nudged_steps == K
        assert np.all(step.free_residual < 1e-15)        # the free phase reached its float fixed point (to an ulp)
        assert np.abs(np.concatenate(step.free_states, 1) - np.concatenate(states, 1)).max() < 1e-12
        bptt = bptt_gradient(net, x, y, step.free_states, K)
        errors_ep.append(rel_err(flatten(step.gradient), bptt))
        errors_truth.append(rel_err(bptt, truth))
    print(f"{net.activation} {nudging}: |EP_K - BPTT_K|/|BPTT_K| {errors_ep}; |BPTT_K - dL|/|dL| {errors_truth}")
    assert max(errors_ep) < (1e-3 if nudging == "positive" else 1e-6)
    assert errors_truth[0] > 1e-2                     # K = 1 is a real truncation...
    assert all(e1 > e2 for e1, e2 in zip(errors_truth[:-1], errors_truth[1:]))   # ... shrinking with K
    assert errors_truth[-1] < 1e-7


def test_bptt_reference_is_the_fixed_point_map(interior):
    """Guard on the test's own BPTT: its unrolled map keeps the free fixed point fixed, and through many steps its
    gradient is the true gradient (the check above would otherwise compare two wrong things)."""
    net, x, y, states, truth = interior
    assert rel_err(bptt_gradient(net, x, y, states, 200), truth) < 1e-9
    assert rel_err(bptt_gradient(net, x, y, states, 200, alternating=True), truth) < 1e-9


@pytest.mark.parametrize("sizes, seed", [((5, 4, 3), 1), ((6, 5, 4, 3), 0)])
def test_alternating_ep_equals_synchronous_bptt_of_about_2k_steps(sizes, seed):
    """With method="alternating" the identity above does not hold sweep for sweep: EP after K alternating nudged
    sweeps is not BPTT through K alternating sweeps (46% apart at K = 1, 7% at K = 2, measured on 6-5-4-3). What
    holds instead: a layered network's coupling is bipartite (odd layers see only even layers), so the synchronous
    iteration splits into two interleaved chains and one even/odd sweep advances one chain by two synchronous
    steps (red-black ordering). EP after K sweeps equals BPTT through n synchronous steps, n = 2K when the output
    layer is updated in the first half-sweep (L odd) and n = 2K - 1 when it is updated in the second (L even: the
    first half-sweep, before the output has been nudged, changes nothing)."""
    net, x, y = interior_problem("hard_sigmoid", seed, sizes)
    check_contraction(net)
    check_interior(free_fixed_point(net, x))
    L = net.num_layers
    for K in (1, 2, 3, 5):
        step = ep(net, x, y, 1e-4, "symmetric", "alternating", tol=1e-300, free_steps=300, nudged_steps=K)
        assert step.nudged_steps == K
        n = 2 * K if L % 2 == 1 else 2 * K - 1
        g = flatten(step.gradient)
        assert rel_err(g, bptt_gradient(net, x, y, step.free_states, n)) < 1e-6, K
        if K <= 2:  # (the truncated gradients all tend to dL/dtheta: only the first few differ clearly)
            for other in {max(n - 1, 1), n + 1} - {n}:
                assert rel_err(g, bptt_gradient(net, x, y, step.free_states, other)) > 1e-2, (K, other)
            assert rel_err(g, bptt_gradient(net, x, y, step.free_states, K, alternating=True)) > 1e-2


# ------------------------------------------------------------------------------------------ 3. saturation
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_ep_matches_finite_differences_with_saturated_units(activation):
    """Units at 0 and 1 in the free state, by a margin: the active set does not change under the FD perturbations
    nor under a nudge of beta = 1e-3, so L is smooth there, the clamped units have zero derivative, and EP (which
    keeps them clamped in both phases) still gives dL/dtheta; the implicit formula with D = diag(inside) agrees."""
    net, x, y = saturating_problem(activation)
    check_contraction(net)
    states = free_fixed_point(net, x)
    s = np.concatenate(states, axis=1)
    fields = net.slope * packed_field(net, x, s)
    at_bound = (s == 0.0) | (s == 1.0)
    off = offsets(net)
    assert at_bound[:, [off[0] + 0, off[1] + 1, off[1] + 3, off[2] + 2]].all()   # the four units pushed out
    # margins: clamped units' fields well beyond the bound, free units well inside
    assert np.all(np.where(at_bound, np.minimum(np.abs(fields), np.abs(fields - 1)), 1.0) > 0.1)
    assert np.all(np.where(at_bound, 0.5, np.minimum(s, 1 - s)) > 0.05)
    fd = finite_difference_gradient(net, x, y)
    implicit = implicit_gradient(net, x, y, states)
    assert rel_err(implicit, fd) < 1e-6
    for method in ("fixed_point", "alternating"):
        sym = ep(net, x, y, 1e-3, "symmetric", method)
        assert rel_err(flatten(sym.gradient), fd) < 1e-5, method
        pos = ep(net, x, y, 1e-3, "positive", method)
        assert rel_err(flatten(pos.gradient), fd) < 3e-3, method
    # the clamped units get no gradient: rows of W_k and entries of b_k of a unit at a bound in every sample
    grads = unflatten(fd, parameters(net))
    assert np.abs(grads[1][0]) < 1e-9 and np.abs(grads[0][0]).max() < 1e-9      # s_1[0] = 1: b_1[0], W_0[0, :]
