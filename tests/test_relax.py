"""Integrators and backends of ebm_sim.relax: the Numba kernels against the numpy reference and scipy, fixed points,
residuals and stopping, divergence, early retirement, and clear errors for bad input.

Numba compiles one kernel per (kernel, dtype, depth): most tests use depth-3 networks to share compilations.
"""
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from ebm_sim import energy as E
from ebm_sim import integrators, reference
from ebm_sim.network import ACTIVATIONS, Network
from ebm_sim.relax import DivergenceError, relax

SIZES = (6, 5, 4, 3)
KERNEL_METHODS = list(integrators.methods("dense", "numba", deployable=True))
FIXED_POINT_FAMILY = [m for m in KERNEL_METHODS if not integrators.INTEGRATORS[m].adaptive]
ACTIVATION_NAMES = sorted(ACTIVATIONS)
STATE_TOL = {np.float64: 1e-12, np.float32: 1e-5}


def cat(states):
    return np.concatenate([np.asarray(s, dtype=np.float64) for s in states], axis=-1)


def max_diff(a, b):
    return float(np.max(np.abs(cat(a) - cat(b))))


def data(network, batch, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(batch, network.layer_sizes[0])).astype(network.dtype)
    target = rng.uniform(size=(batch, network.layer_sizes[-1])).astype(network.dtype)
    return x, target


def nudge(beta, target):
    return dict(beta=beta, target=target if beta else None)


def interior_network(activation="hard_sigmoid", seed=1, sizes=SIZES):
    """Small weights and biases b = 0.5 / a: every field a h stays near 0.5, so no state ever reaches 0 or 1
    (checked by the tests) and the dynamics are the linear ODE ds/dt = a h(s) - s."""
    rng = np.random.default_rng(seed)
    a = ACTIVATIONS[activation]
    weights = [rng.uniform(-0.3, 0.3, size=(m, n)) / np.sqrt(n) for n, m in zip(sizes[:-1], sizes[1:])]
    biases = [np.full(m, 0.5 / a) for m in sizes[1:]]
    return Network(weights, biases, activation)


# ------------------------------------------------------------------------------------------ independent maths


def offsets(network):
    return np.concatenate([[0], np.cumsum(network.layer_sizes[1:])])


def ode_rhs(network, x, beta=0.0, target=None):
    """ds/dt = a h(s) - s for one sample, written from the equations (no projection: interior states only)."""
    W = [w.astype(np.float64) for w in network.weights]
    b = [v.astype(np.float64) for v in network.biases]
    a, L, off = network.slope, network.num_layers, offsets(network)

    def rhs(_t, s):
        layers = [x] + [s[off[k]:off[k + 1]] for k in range(L)]
        out = []
        for k in range(1, L + 1):
            h = W[k - 1] @ layers[k - 1] + b[k - 1]
            if k < L:
                h = h + W[k].T @ layers[k + 1]
            if k == L and beta:
                h = h - beta * (layers[k] - target)
            out.append(a * h - layers[k])
        return np.concatenate(out)

    return rhs


def linear_fixed_point(network, x, beta=0.0, target=None):
    """The solution of s = a h(s) (no clipping), for one sample: (I/a - (A + A^T) + beta P_out) s = c."""
    off, L, a = offsets(network), network.num_layers, network.slope
    n = off[-1]
    A = np.zeros((n, n))
    for k in range(1, L):
        A[off[k]:off[k + 1], off[k - 1]:off[k]] = network.weights[k]
    M = np.eye(n) / a - (A + A.T)
    c = np.concatenate([network.weights[0] @ x + network.biases[0]] + list(network.biases[1:])).astype(np.float64)
    if beta:
        M[off[-2]:, off[-2]:] += beta * np.eye(off[-1] - off[-2])
        c[off[-2]:] += beta * target
    return np.linalg.solve(M, c)


# ------------------------------------------------------------------------------------------ numba vs numpy


def assert_same_steps(fast, slow, tol, dtype):
    """Same step counts; in float32 a sample may stop one step apart only on a near tie.

    In float32 the states are quantized (an ulp is 6e-8 near 0.5), so the residual max |s_t+1 - s_t| / dt moves in
    jumps of ~1-2% of tol = 1e-5: an ulp of difference between two correct implementations (the order of the
    sums in the fields) can put the residual on either side of tol at the step where it crosses. Where the counts
    differ, the run that went on must have been within a few percent of tol at the other run's last step."""
    if dtype == np.float64:
        np.testing.assert_array_equal(fast.steps, slow.steps)
        return
    assert np.all(np.abs(fast.steps - slow.steps) <= 1)
    dt = fast.settings.dt
    for b in np.nonzero(fast.steps != slow.steps)[0]:
        longer = fast if fast.steps[b] > slow.steps[b] else slow
        step = min(fast.steps[b], slow.steps[b])
        frames = cat(longer.trajectory)
        change = np.abs(frames[step, b] - frames[step - 1, b]).max() / dt
        assert abs(change - tol) <= 0.05 * tol, (b, change)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("batch", [3, 7])  # at most 4 active rows and more: both product paths of the kernels
@pytest.mark.parametrize("method", FIXED_POINT_FAMILY)
def test_numba_matches_numpy_fixed_point_family(method, batch, beta, dtype):
    net = Network.init(SIZES, seed=2, dtype=dtype, gain=0.6)
    x, target = data(net, batch, seed=3)
    tol = 1e-9 if dtype == np.float64 else 1e-5
    kw = dict(method=method, tol=tol, max_steps=2000, record=True, **nudge(beta, target))
    if method == "euler":
        kw["dt"] = 0.3
    fast = relax(net, x, backend="numba", **kw)
    slow = relax(net, x, backend="numpy", **kw)
    assert fast.converged.all() and slow.converged.all()
    assert_same_steps(fast, slow, tol, dtype)
    assert max_diff(fast.states, slow.states) <= STATE_TOL[dtype]
    assert all(s.dtype == dtype for s in fast.states + slow.states)
    np.testing.assert_array_equal(fast.converged, slow.converged)
    assert np.all(fast.residual < tol) and np.all(slow.residual < tol)
    # the whole recorded trajectories, frame by frame (a retired sample keeps its final state)
    assert [t.shape for t in fast.trajectory] == [t.shape for t in slow.trajectory]
    assert fast.trajectory[0].shape[0] == fast.steps.max() + 1
    assert max_diff(fast.trajectory, slow.trajectory) <= 10 * STATE_TOL[dtype]
    np.testing.assert_allclose(fast.energy, slow.energy, rtol=0, atol=1e-4 if dtype == np.float32 else 1e-10)


# RK45 is compared more loosely than the fixed-point family, for two reasons found while writing these tests:
# - its error estimate is clip(y5) - clip(y4), a difference of two nearly equal O(1) numbers, so an ulp of
#   difference between the backends (the order of the sums in the fields) becomes ~1e-7 (relative) in the next
#   step size; the two runs then take slightly different steps (trajectories drift apart by ~1e-9 in float64 even
#   with every state inside the box, more when states reach a bound and accept/reject decisions flip), and both
#   stop within ~tol of the same fixed point;
# - for a float32 network the numpy reference runs its stages in float64 (its step sizes are float64 arrays),
#   while the kernel runs them in float32, so float32 step counts are not comparable.
# The first attempt starts from the same state with the same step size, so frame 1 must agree closely.


@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("batch", [3, 7])
def test_numba_matches_numpy_rk45_interior_float64(batch, beta):
    """No state at a bound: same attempts, same final states to ~1e-12."""
    net = interior_network()
    x, target = data(net, batch, seed=4)
    initial = [np.full((batch, n), 0.5) for n in net.layer_sizes[1:]]
    kw = dict(method="rk45", tol=1e-10, max_steps=2000, record=True, initial=initial, **nudge(beta, target))
    fast = relax(net, x, backend="numba", **kw)
    slow = relax(net, x, backend="numpy", **kw)
    assert fast.converged.all() and slow.converged.all()
    assert 0.05 < cat(fast.trajectory).min() and cat(fast.trajectory).max() < 0.95  # really interior
    np.testing.assert_array_equal(fast.steps, slow.steps)
    assert max_diff(fast.states, slow.states) <= 1e-12
    assert [t.shape for t in fast.trajectory] == [t.shape for t in slow.trajectory]
    assert max_diff([t[:2] for t in fast.trajectory], [t[:2] for t in slow.trajectory]) <= 1e-14
    assert max_diff(fast.trajectory, slow.trajectory) <= 1e-8
    np.testing.assert_allclose(fast.energy, slow.energy, rtol=0, atol=1e-8)


@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("batch", [3, 7])
def test_numba_matches_numpy_rk45_interior_float32(batch, beta):
    """Both stop within ~tol of the true fixed point (the float64 linear solve) and of each other."""
    net = interior_network().astype(np.float32)
    x, target = data(net, batch, seed=4)
    initial = [np.full((batch, n), 0.5, np.float32) for n in net.layer_sizes[1:]]
    tol = 1e-5
    kw = dict(method="rk45", tol=tol, max_steps=2000, record=True, initial=initial, **nudge(beta, target))
    fast = relax(net, x, backend="numba", **kw)
    slow = relax(net, x, backend="numpy", **kw)
    assert fast.converged.all() and slow.converged.all()
    assert all(s.dtype == np.float32 for s in fast.states + slow.states)
    exact = np.stack([linear_fixed_point(net.astype(np.float64), x[b].astype(np.float64), beta,
                                          target[b].astype(np.float64)) for b in range(batch)])
    assert np.abs(cat(fast.states) - exact).max() <= 5 * tol
    assert np.abs(cat(slow.states) - exact).max() <= 5 * tol
    assert max_diff(fast.states, slow.states) <= 5 * tol
    assert max_diff([t[:2] for t in fast.trajectory], [t[:2] for t in slow.trajectory]) <= 1e-6


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_numba_matches_numpy_rk45_saturating(beta, dtype):
    """States that reach 0 or 1: both stop within ~tol of the same fixed point in about the same attempts."""
    net = Network.init(SIZES, seed=2, dtype=dtype, gain=0.6)
    x, target = data(net, 7, seed=3)
    tol = 1e-10 if dtype == np.float64 else 1e-5
    kw = dict(method="rk45", tol=tol, max_steps=2000, record=True, **nudge(beta, target))
    fast = relax(net, x, backend="numba", **kw)
    slow = relax(net, x, backend="numpy", **kw)
    assert fast.converged.all() and slow.converged.all()
    assert (cat(fast.states) == 0).any()  # really saturating
    assert max_diff(fast.states, slow.states) <= 10 * tol
    first = 1e-14 if dtype == np.float64 else 1e-6
    assert max_diff([t[:2] for t in fast.trajectory], [t[:2] for t in slow.trajectory]) <= first
    if dtype == np.float64:
        assert np.all(np.abs(fast.steps - slow.steps) <= np.maximum(3, 0.15 * slow.steps))


@pytest.mark.slow
def test_benchmark_shape_numba_matches_numpy():
    """784-512-512-10, float32, batch 8, fixed-point iteration at tol 1e-4: the benchmark's configuration."""
    net = Network.init((784, 512, 512, 10), seed=0, dtype=np.float32).scaled(0.5)
    x = np.random.default_rng(0).uniform(size=(8, 784)).astype(np.float32)
    fast = relax(net, x, method="fixed_point", tol=1e-4, max_steps=500)
    slow = relax(net, x, method="fixed_point", tol=1e-4, max_steps=500, backend="numpy")
    assert fast.converged.all() and slow.converged.all()
    np.testing.assert_array_equal(fast.steps, slow.steps)
    assert max_diff(fast.states, slow.states) <= 1e-5
    assert all(s.dtype == np.float32 for s in fast.states)


# ------------------------------------------------------------------------------------------ one fixed point


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_every_integrator_reaches_the_same_fixed_point(beta, activation):
    """gain 0.5: the fixed-point map is a contraction, so the fixed point is unique and every method finds it."""
    net = Network.init(SIZES, seed=6, dtype=np.float64, gain=0.5, activation=activation)
    x, target = data(net, 3, seed=6)
    results = {}
    for method in KERNEL_METHODS + ["solve_ivp"]:
        result = relax(net, x, method=method, tol=1e-9, max_steps=20_000, **nudge(beta, target))
        assert result.converged.all(), method
        results[method] = result.states
    reference_states = results["fixed_point"]
    for method, states in results.items():
        assert max_diff(states, reference_states) <= 1e-6, method
    # and it is a fixed point of s = clip(a h(s), 0, 1)
    fields = E.local_fields(net, x, reference_states, beta, target if beta else None)
    assert max_diff([np.clip(net.slope * h, 0, 1) for h in fields], reference_states) <= 1e-8


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize("beta", [0.0, 0.4])
def test_rk45_matches_solve_ivp_and_linear_solution_inside_the_box(beta, activation):
    net = interior_network(activation)
    x, target = data(net, 4, seed=7)
    # (a) RK45 with a fixed step (dt = dt_max and every step accepted) follows the exact flow: frame k is the
    # state at time k dt; compare with scipy's DOP853 at tight tolerances on the ODE written in this file.
    dt = 0.05
    middle = [np.full((x.shape[0], n), 0.5) for n in net.layer_sizes[1:]]
    start = np.full(sum(net.layer_sizes[1:]), 0.5)
    fixed = relax(net, x, method="rk45", dt=dt, dt_max=dt, rtol=1e-6, atol=1e-9, tol=1e-12, max_steps=300,
                  record=True, backend="numpy", initial=middle, **nudge(beta, target))
    frames = cat(fixed.trajectory)
    assert frames.shape[0] == 301
    assert np.all(np.abs(np.diff(frames, axis=0)).max(axis=2) > 0)  # every attempt was accepted
    for b in range(x.shape[0]):
        rhs = ode_rhs(net, x[b], beta, target[b])
        times = dt * np.arange(frames.shape[0])
        exact = solve_ivp(rhs, (0, times[-1]), start, method="DOP853", t_eval=times,
                          rtol=1e-12, atol=1e-14)
        assert exact.success
        assert 0.0 < exact.y.min() and exact.y.max() < 1.0
        np.testing.assert_allclose(frames[:, b], exact.y.T, rtol=0, atol=1e-8)
    # (b) adaptive RK45 to the fixed point, both backends, against solve_ivp far in time and the linear solve
    for backend in ["numpy", "numba"]:
        adaptive = relax(net, x, method="rk45", tol=1e-10, max_steps=5000, backend=backend, **nudge(beta, target))
        assert adaptive.converged.all()
        for b in range(x.shape[0]):
            rhs = ode_rhs(net, x[b], beta, target[b])
            late = solve_ivp(rhs, (0, 60.0), start, method="DOP853", rtol=1e-12, atol=1e-14)
            s_star = linear_fixed_point(net, x[b], beta, target[b])
            assert np.abs(rhs(0, s_star)).max() < 1e-12
            np.testing.assert_allclose(late.y[:, -1], s_star, atol=1e-9)
            np.testing.assert_allclose(cat([s[b] for s in adaptive.states]), s_star, rtol=0, atol=1e-8)
    # (c) every kernel converges to the linear-algebra solution
    for method in KERNEL_METHODS:
        result = relax(net, x, method=method, tol=1e-11, max_steps=20_000, **nudge(beta, target))
        assert result.converged.all(), method
        expected = np.stack([linear_fixed_point(net, x[b], beta, target[b]) for b in range(x.shape[0])])
        assert 0.0 < expected.min() and expected.max() < 1.0
        np.testing.assert_allclose(cat(result.states), expected, rtol=0, atol=1e-9, err_msg=method)


@pytest.mark.parametrize("activation", ACTIVATION_NAMES)
@pytest.mark.parametrize("method", ["euler", "alternating", "rk45"])
def test_activations_fixed_points_are_clipped_scaled_fields(method, activation):
    """Both activations: fixed points satisfy s = clip(a h, 0, 1), with states both saturated and inside.

    The weights are large enough that the synchronous iteration may oscillate (period 2); the alternating one
    minimizes E exactly over the odd, then the even layers (block coordinate descent), so it converges."""
    net = Network.init(SIZES, seed=8, dtype=np.float64, gain=1.0, activation=activation)
    net = Network([w * 2.0 for w in net.weights], [b + 0.3 for b in net.biases], activation)
    x, _ = data(net, 6, seed=8)
    result = relax(net, x, method=method, tol=1e-10, max_steps=20_000)
    assert result.converged.all()
    states = cat(result.states)
    assert (states == 0).any() and ((states > 0) & (states < 1)).any()
    fields = E.local_fields(net, x, result.states)
    assert max_diff([np.clip(net.slope * h, 0.0, 1.0) for h in fields], result.states) <= 1e-8
    if activation == "hard_sigmoid_half":  # the slope really is used: clip(h) is not a fixed point
        assert max_diff([np.clip(h, 0.0, 1.0) for h in fields], result.states) > 1e-3


# ------------------------------------------------------------------------------------------ residuals and stopping


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("method", FIXED_POINT_FAMILY)
def test_fixed_point_family_residual_is_the_last_change(method, backend):
    net = Network.init(SIZES, seed=9, dtype=np.float64, gain=0.7)
    x, target = data(net, 6, seed=9)
    tol, dt = 1e-7, (0.4 if method == "euler" else 1.0)
    result = relax(net, x, method=method, tol=tol, max_steps=5000, dt=dt, beta=0.3, target=target, record=True,
                   backend=backend)
    assert result.converged.all()
    assert np.all(result.residual < tol)
    frames = cat(result.trajectory)
    for b, steps in enumerate(result.steps):
        last_change = np.abs(frames[steps, b] - frames[steps - 1, b]).max() / dt
        assert result.residual[b] == pytest.approx(last_change, rel=1e-9, abs=1e-15)
        assert np.all(frames[steps:, b] == frames[steps, b])  # retired: frozen
    np.testing.assert_array_equal(cat(result.states), frames[result.steps, np.arange(len(result.steps))])
    # one more reference step from the returned state moves it by at most ~tol (the map is a contraction)
    after = reference.euler_step(net, x, result.states, dt, 0.3, target, alternating=method == "alternating")
    assert np.all(E.max_abs([p - q for p, q in zip(after, result.states)]) / dt <= tol)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("method", ["rk45", "solve_ivp"])
def test_continuous_methods_residual_is_projected_velocity(method, backend):
    net = Network.init(SIZES, seed=9, dtype=np.float64, gain=0.7)
    x, target = data(net, 5, seed=9)
    tol = 1e-7
    result = relax(net, x, method=method, tol=tol, max_steps=5000, beta=0.3, target=target, backend=backend)
    assert result.converged.all()
    projected = E.projected_velocity(result.states, E.velocity(net, x, result.states, 0.3, target))
    independent = E.max_abs(projected)
    assert np.all(independent < tol)
    np.testing.assert_allclose(result.residual, independent, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("method", KERNEL_METHODS)
def test_converged_flag_and_step_cap(method, backend, dtype):
    net = interior_network().astype(dtype)
    x, _ = data(net, 6, seed=10)
    tol = 1e-6 if dtype == np.float64 else 1e-4
    done = relax(net, x, method=method, tol=tol, max_steps=5000, backend=backend)
    assert done.converged.all()
    np.testing.assert_array_equal(done.converged, done.residual < tol)
    assert not done.diverged.any()
    capped = relax(net, x, method=method, tol=1e-14, max_steps=3, backend=backend)
    assert not capped.converged.any()
    np.testing.assert_array_equal(capped.steps, 3)
    assert np.all(capped.residual >= 1e-14) and np.all(np.isfinite(capped.residual))
    assert not capped.diverged.any()


def test_solve_ivp_honours_the_step_cap():
    net = interior_network()
    x, _ = data(net, 2, seed=10)
    capped = relax(net, x, method="solve_ivp", tol=1e-14, rtol=1e-10, atol=1e-12, max_steps=3)
    assert not capped.converged.any()
    assert np.all(capped.steps <= 3)


def test_initial_states_are_used_and_a_fixed_point_is_kept():
    net = Network.init(SIZES, seed=11, dtype=np.float64, gain=0.6)
    x, _ = data(net, 4, seed=11)
    first = relax(net, x, method="fixed_point", tol=1e-12, max_steps=5000)
    for method in KERNEL_METHODS:
        for backend in ["numba", "numpy"]:
            again = relax(net, x, method=method, tol=1e-6, max_steps=5000, initial=first.states, backend=backend)
            assert again.converged.all()
            assert np.all(again.steps <= 1), (method, backend)
            assert max_diff(again.states, first.states) <= 1e-9


# ------------------------------------------------------------------------------------------ early retirement


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("backend,method", [("numba", m) for m in KERNEL_METHODS]
                         + [("numpy", m) for m in FIXED_POINT_FAMILY])
def test_early_retirement_matches_samples_run_alone(method, backend, dtype):
    """A batch mixing easy samples (started at their fixed point, or with zero input) and hard ones (random input
    and random start): every sample takes the steps it takes alone and ends in the same state."""
    net = Network.init(SIZES, seed=12, dtype=dtype, gain=1.0)
    rng = np.random.default_rng(12)
    batch = 8
    x = rng.uniform(size=(batch, SIZES[0])).astype(dtype)
    x[[1, 4]] = 0.0
    initial = [rng.uniform(size=(batch, n)).astype(dtype) for n in SIZES[1:]]
    tol = 1e-7 if dtype == np.float64 else 1e-4
    kw = dict(method=method, tol=tol, max_steps=3000, backend=backend)
    settled = relax(net, x, initial=initial, **kw)
    for k in range(len(initial)):  # samples 0 and 5 start at their fixed point
        initial[k][[0, 5]] = settled.states[k][[0, 5]]
    together = relax(net, x, initial=initial, **kw)
    alone = [relax(net, x[b:b + 1], initial=[s[b:b + 1] for s in initial], **kw) for b in range(batch)]
    assert together.converged.all()
    assert len(set(together.steps.tolist())) >= 3  # the batch really mixes easy and hard samples
    # a sample relaxed alone has its products computed by fused passes over each W (up to SMALL_BATCH rows), the
    # batch by GEMM calls: sums in another order, a last-bit difference, which rk45's step-size control may grow (in
    # float32 its accepted steps then differ by a few and the states agree to tol, not better; float64 holds rk45 to
    # the same steps and a tenth of tol)
    alone_steps = [r.steps[0] for r in alone]
    float32_rk45 = method == "rk45" and dtype == np.float32
    if float32_rk45:
        np.testing.assert_allclose(together.steps, alone_steps, rtol=0.2)
    else:
        np.testing.assert_array_equal(together.steps, alone_steps)
    bound = (1e-12 if dtype == np.float64 else 1e-6) if method != "rk45" else tol if float32_rk45 else tol / 10
    assert max_diff(together.states, [np.concatenate([r.states[k] for r in alone]) for k in range(len(SIZES) - 1)]) \
        <= bound


# ------------------------------------------------------------------------------------------ divergence


def nan_network():
    """float32, depth 3. With x = 1 the input term x W_0^T = 3 * 2e38 overflows to +inf; once s_2 = 1 (its field
    W_1 s_1 = 1e38 > 0), the feedback s_2 W_1 on the first unit of s_1 is 2 * (-2e38) = -inf: inf - inf = NaN.
    With x = 0 every field is finite and the sample settles."""
    f = np.float32
    w0 = np.full((2, 3), 2e38, f)
    w1 = np.array([[-2e38, 3e38], [-2e38, 3e38]], f)
    w2 = np.zeros((2, 2), f)
    return Network([w0, w1, w2], [np.zeros(2, f)] * 3)


NAN_X = np.array([[1, 1, 1], [0, 0, 0]], np.float32)


OVERFLOW_IS_THE_POINT = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
                         pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("method", KERNEL_METHODS)
@OVERFLOW_IS_THE_POINT[0]
@OVERFLOW_IS_THE_POINT[1]
def test_divergence_raises_or_flags(method, backend):
    net = nan_network()
    with pytest.raises(DivergenceError, match=r"NaN or inf for 1 of 2 samples \(first: \[0\]\)"):
        relax(net, NAN_X, method=method, backend=backend, max_steps=50)
    flagged = relax(net, NAN_X, method=method, backend=backend, max_steps=50, on_divergence="flag", record=True)
    np.testing.assert_array_equal(flagged.diverged, [True, False])
    np.testing.assert_array_equal(flagged.converged, [False, True])
    assert not np.isfinite(flagged.residual[0])
    assert np.all(np.isfinite(cat(flagged.states)[1]))
    assert flagged.steps[0] < 50  # it stopped at once rather than running to the cap
    if method != "rk45":  # the NaN reached the state (rk45 stops on the infinite velocity first)
        assert np.isnan(cat(flagged.states)[0]).any()


@OVERFLOW_IS_THE_POINT[0]
@OVERFLOW_IS_THE_POINT[1]
def test_divergence_agrees_between_backends():
    net = nan_network()
    for method in KERNEL_METHODS:
        fast = relax(net, NAN_X, method=method, on_divergence="flag")
        slow = relax(net, NAN_X, method=method, backend="numpy", on_divergence="flag")
        np.testing.assert_array_equal(fast.diverged, slow.diverged)
        np.testing.assert_array_equal(fast.converged, slow.converged)


@OVERFLOW_IS_THE_POINT[0]
@OVERFLOW_IS_THE_POINT[1]
@pytest.mark.parametrize("method", FIXED_POINT_FAMILY)
def test_an_infinite_field_saturates_in_both_backends(method):
    net = Network([np.full((1, 2), 3e38, np.float32)], [np.zeros(1, np.float32)])  # x W^T = 6e38 = inf
    x = np.ones((1, 2), np.float32)
    slow = relax(net, x, method=method, backend="numpy", on_divergence="flag")
    fast = relax(net, x, method=method, backend="numba", on_divergence="flag")
    assert not slow.diverged.any() and slow.states[0][0, 0] == 1.0
    assert not fast.diverged.any()
    np.testing.assert_array_equal(fast.steps, slow.steps)
    np.testing.assert_array_equal(fast.states[0], slow.states[0])


# ------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def small():
    net = Network.init(SIZES, seed=0, dtype=np.float32)
    x, target = data(net, 2, seed=0)
    return net, x, target


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=np.zeros((2, 5))), r"x must have shape \(batch, 6\)"),
    (dict(x=np.zeros((2, 6, 1))), r"x must have shape \(batch, 6\)"),
    (dict(x=np.zeros((0, 6))), "x holds no samples"),
    (dict(x=np.array([[0.1] * 6, [np.nan] + [0.1] * 5])), r"x holds NaN or inf in 1 sample\(s\), first: \[1\]"),
    (dict(x=np.array([[np.inf] * 6])), "x holds NaN or inf"),
    (dict(x=np.zeros((2, 6), dtype=bool)), "x must be numeric"),
    (dict(beta=0.5), "beta != 0 needs a target"),
    (dict(beta=0.5, target=np.zeros((2, 4))), r"target must have shape \(2, 3\)"),
    (dict(beta=0.5, target=np.zeros(3)), r"target must have shape \(2, 3\)"),
    (dict(beta=0.5, target=np.full((2, 3), np.nan)), "target holds NaN"),
    (dict(beta=float("nan")), "beta must be finite"),
    (dict(method="newton"), "unknown method 'newton'"),
    (dict(backend="cuda"), "unknown backend 'cuda'"),
    (dict(method="euler", dt=1.5), r"dt = 1.5 > 1 overshoots"),
    (dict(method="euler", dt=0.0), "dt must be a positive finite number"),
    (dict(method="euler", dt=-0.1), "dt must be a positive finite number"),
    (dict(method="fixed_point", dt=0.5), "is the fixed-point iteration"),
    (dict(method="alternating", dt=0.5), "is the fixed-point iteration"),
    (dict(tol=-1e-4), "tol must be a finite number >= 0"),
    (dict(method="rk45", tol=0.0), "tol must be a positive finite number"),
    (dict(tol=float("nan")), "tol must be a finite number >= 0"),
    (dict(method="rk45", rtol=-1.0), "rtol must be a positive finite number"),
    (dict(method="rk45", atol=0.0), "atol must be a positive finite number"),
    (dict(method="rk45", dt_max=0.0), "dt_max must be a positive finite number"),
    (dict(max_steps=0), "max_steps must be an integer >= 1"),
    (dict(max_steps=2.5), "max_steps must be an integer >= 1"),
    (dict(on_divergence="ignore"), "on_divergence must be 'raise' or 'flag'"),
    (dict(initial=[np.zeros((2, 5)), np.zeros((2, 4))]), "initial needs 3 arrays"),
    (dict(initial=[np.zeros((2, 5)), np.zeros((2, 3)), np.zeros((2, 3))]),
     r"initial state of layer 2 must have shape \(2, 4\)"),
    (dict(initial=[np.zeros((3, 5)), np.zeros((3, 4)), np.zeros((3, 3))]),
     r"initial state of layer 1 must have shape \(2, 5\)"),
    (dict(initial=[np.zeros((2, 5)), np.full((2, 4), np.nan), np.zeros((2, 3))]),
     "initial state of layer 2 holds NaN"),
    (dict(method="solve_ivp", record=True), "record=True is not available for method='solve_ivp'"),
])
def test_relax_rejects_bad_input(small, kwargs, match):
    net, x, _ = small
    kwargs = dict(kwargs)
    x = kwargs.pop("x", x)
    with pytest.raises(ValueError, match=match):
        relax(net, x, **kwargs)


def test_relax_rejects_an_oversized_recording(small):
    net, x, _ = small
    with pytest.raises(ValueError, match="GiB; lower max_steps or the batch size"):
        relax(net, np.zeros((10_000, 6)), record=True, max_steps=10 ** 7)


def test_relax_accepts_numpy_scalar_settings(small):
    net, x, _ = small
    relax(net, x, method="euler", tol=np.float32(1e-4), dt=np.float32(0.5))


def test_relax_accepts_a_single_sample_and_converts_dtypes(small):
    net, x, _ = small
    one = relax(net, x[0].astype(np.float64))
    assert one.states[0].shape == (1, 5) and one.states[0].dtype == np.float32
    two = relax(net.astype(np.float64), x.astype(np.float32), initial=[np.full((2, n), 2.0) for n in SIZES[1:]],
                max_steps=1)
    assert two.states[0].dtype == np.float64  # and the out-of-box initial state was projected first
    np.testing.assert_array_equal(two.steps, 1)


@pytest.mark.parametrize("build,match", [
    (lambda: Network([np.zeros((4, 6))], [np.zeros(3)]), "b_1 has 3 entries but W_0 has 4 rows"),
    (lambda: Network([np.zeros((4, 6)), np.zeros((3, 5))], [np.zeros(4), np.zeros(3)]),
     "W_1 has 5 columns but layer 1 has 4 units"),
    (lambda: Network([np.zeros((4, 6)), np.zeros((3, 4))], [np.zeros(4)]), "2 weight matrices but 1 bias vectors"),
    (lambda: Network([], []), "at least one weight matrix"),
    (lambda: Network([np.zeros(6)], [np.zeros(1)]), "W_0 must be 2-D"),
    (lambda: Network([np.zeros((4, 6))], [np.zeros((4, 1))]), "b_1 1-D"),
    (lambda: Network([np.array([[np.nan, 0.0]])], [np.zeros(1)]), "W_0 or b_1 holds NaN or inf"),
    (lambda: Network([np.zeros((1, 2))], [np.array([np.inf])]), "W_0 or b_1 holds NaN or inf"),
    (lambda: Network([np.zeros((1, 2), dtype=np.int64)], [np.zeros(1)]), "dtype must be float32 or float64"),
    (lambda: Network([np.zeros((1, 2))], [np.zeros(1)], activation="relu"), "unknown activation 'relu'"),
    (lambda: Network.init((784,)), "needs an input and at least one more layer"),
    (lambda: Network.init((784, 0, 10)), "layer sizes must be positive integers"),
    (lambda: Network.init((784, -3)), "layer sizes must be positive integers"),
    (lambda: Network.init((784, 2.5)), "layer sizes must be positive integers"),
    (lambda: Network.init((4, 3), gain=0.0), "gain must be positive"),
    (lambda: Network.init((4, 3), gain=float("nan")), "gain must be positive"),
    (lambda: Network.init((4, 3), dtype=np.float16), "dtype must be float32 or float64"),
    (lambda: Network.init((4, 3), activation="tanh"), "unknown activation 'tanh'"),
])
def test_network_rejects_bad_parameters(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_tol_zero_runs_exactly_max_steps(small):
    """tol = 0 turns the convergence test off for the fixed-point family: every sample takes max_steps steps."""
    net, x, _ = small
    for method in ("fixed_point", "euler", "alternating"):
        result = relax(net, x, method=method, tol=0.0, max_steps=17)
        assert np.all(result.steps == 17) and not result.converged.any(), method
        reference = relax(net, x, method=method, tol=0.0, max_steps=17, backend="numpy")
        np.testing.assert_allclose(cat(result.states), cat(reference.states), atol=1e-6)
