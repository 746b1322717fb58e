"""Slow, obvious references for every integrator: plain numpy on lists of layers, and scipy's solve_ivp.

Same equations and stopping rules as the Numba kernels (see :mod:`ebm_sim.relax` for the methods and
:mod:`ebm_sim.energy` for the dynamics); tests and benchmarks hold the kernels against these. A converged sample
is frozen (its state, steps and residual no longer change) while the others go on.
"""
from __future__ import annotations

import numpy as np
from scipy.integrate import RK45

from . import energy as E
from .network import Network
from .integrators import DORMAND_PRINCE
from .relax_types import RelaxResult, RelaxSettings

DP_A, DP_E = DORMAND_PRINCE.a.tolist(), DORMAND_PRINCE.e.tolist()  # ebm_sim.integrators' tableau, Python floats


def euler_step(network, x, states, dt, beta, target, alternating=False):
    """One (projected) Euler step, synchronous or alternating; dt = 1 is the fixed-point iteration clip(a h)."""
    a = network.slope
    new = [s.copy() for s in states]

    def update(k, fields):
        if dt == 1.0:
            new[k] = np.clip(a * fields[k], 0.0, 1.0)
        else:
            new[k] = np.clip(states[k] + dt * (a * fields[k] - states[k]), 0.0, 1.0)

    if alternating:
        for parity in (0, 1):  # 0-based layers 0, 2, ... are s_1, s_3, ...
            fields = E.local_fields(network, x, new, beta, target)
            for k in range(parity, len(states), 2):
                update(k, fields)
    else:
        fields = E.local_fields(network, x, states, beta, target)
        for k in range(len(states)):
            update(k, fields)
    return new


def flow(network, x, states, beta, target):
    """The projected flow P(a h - s) (list of (B, n_k))."""
    return E.projected_velocity(states, E.velocity(network, x, states, beta, target))


def _relax_fixed_point(network, x, settings, target, states, record):
    dt, alternating = settings.dt, settings.method == "alternating"
    batch = x.shape[0]
    active = np.ones(batch, dtype=bool)
    steps = np.zeros(batch, dtype=np.int64)
    residual = np.full(batch, np.inf)
    frames = [states]
    for step in range(1, settings.max_steps + 1):
        new = euler_step(network, x, states, dt, settings.beta, target, alternating)
        change = E.max_abs([n - s for n, s in zip(new, states)]) / dt
        states = [np.where(active[:, None], n, s) for n, s in zip(new, states)]
        residual = np.where(active, change, residual)
        steps = np.where(active, step, steps)
        active &= (residual >= settings.tol) & np.isfinite(residual)
        if record:
            frames.append(states)
        if not active.any():
            break
    return states, steps, residual, frames


def rk45_packed(f, s, settings: RelaxSettings, record: bool):
    """Dormand-Prince 5(4) with per-sample step control on packed states s (B, N) under the flow f: (B, N) -> (B, N),
    projected onto [0, 1] after each accepted step; a sample stops when max |f| < tol or after max_steps steps.
    Returns (s, steps, residual, frames: list of packed states or None). Any network whose states pack into (B, N)
    uses it (dense networks here, layered ones in :mod:`ebm_sim.model.dynamics`)."""
    batch = s.shape[0]
    h = np.full(batch, settings.dt, dtype=s.dtype)
    steps = np.zeros(batch, dtype=np.int64)
    active = np.ones(batch, dtype=bool)
    frames = [s] if record else None
    while True:
        k1 = f(s)
        residual = np.max(np.abs(k1), axis=1)
        active &= (residual >= settings.tol) & np.isfinite(residual) & (steps < settings.max_steps)
        if not active.any():
            break
        ks = [k1]
        for stage in range(1, 7):
            ks.append(f(s + h[:, None] * sum(c * k for c, k in zip(DP_A[stage], ks))))
        y5 = s + h[:, None] * sum(c * k for c, k in zip(DP_A[6], ks))
        y4 = y5 - h[:, None] * sum(c * k for c, k in zip(DP_E, ks))
        y5c, y4c = np.clip(y5, 0.0, 1.0), np.clip(y4, 0.0, 1.0)
        scale = settings.atol + settings.rtol * np.maximum(np.abs(s), np.abs(y5c))
        error = np.max(np.abs(y5c - y4c) / scale, axis=1)
        accept = active & (error <= 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            grow = np.where(error == 0.0, 10.0, np.minimum(10.0, 0.9 * error ** -0.2))
            shrink = np.where(np.isfinite(error), np.maximum(0.2, 0.9 * error ** -0.2), 0.2)
        s = np.where(accept[:, None], y5c, s)
        h = np.where(active, np.minimum(h * np.where(error <= 1.0, grow, shrink), settings.dt_max), h)
        steps = steps + active
        if record:
            frames.append(s)
    return s, steps, residual, frames


def solve_ivp_packed(rhs_of_sample, s, settings: RelaxSettings):
    """SciPy's RK45 (the solver behind ``solve_ivp(method="RK45")``) per sample, float64, stepped by hand so that the
    residual max |rhs| < tol and the step cap are checked after every step. ``rhs_of_sample(b)`` gives sample b's
    right-hand side, a function of its packed state (N,). Returns (finals (B, N), steps, residuals)."""
    finals, steps, residuals = [], [], []
    for b in range(s.shape[0]):
        rhs = rhs_of_sample(b)
        solver = RK45(lambda _t, y: rhs(y), 0.0, s[b].astype(np.float64), np.inf, rtol=settings.rtol,
                      atol=settings.atol, first_step=settings.dt)
        residual, taken = np.max(np.abs(rhs(solver.y))), 0
        while np.isfinite(residual) and residual >= settings.tol and taken < settings.max_steps:
            message = solver.step()
            taken += 1
            residual = np.max(np.abs(rhs(np.clip(solver.y, 0.0, 1.0))))
            if message is not None:  # the solver failed (step size underflow)
                break
        finals.append(np.clip(solver.y, 0.0, 1.0))
        steps.append(taken)
        residuals.append(residual)
    return np.stack(finals), np.array(steps), np.array(residuals)


def _relax_rk45(network, x, settings, target, states, record):
    sizes = np.cumsum(network.state_sizes)[:-1]
    split = lambda flat: np.split(flat, sizes, axis=1)  # noqa: E731
    f = lambda flat: np.concatenate(flow(network, x, split(flat), settings.beta, target), axis=1)  # noqa: E731
    s, steps, residual, frames = rk45_packed(f, np.concatenate(states, axis=1), settings, record)
    return split(s), steps, residual, None if frames is None else [split(frame) for frame in frames]


def _relax_solve_ivp(network, x, settings, target, states, record):
    """SciPy's RK45 on the projected flow in float64, one sample at a time (``solve_ivp_packed``); steps counts the
    solver's steps."""
    sizes = np.cumsum(network.state_sizes)[:-1]
    net64 = network.astype(np.float64)

    def rhs_of_sample(b):
        xb = x[b:b + 1].astype(np.float64)
        tb = None if target is None else target[b:b + 1].astype(np.float64)
        return lambda flat: np.concatenate(flow(net64, xb, np.split(flat[None, :], sizes, axis=1), settings.beta,
                                                tb), axis=1)[0]

    finals, steps, residuals = solve_ivp_packed(rhs_of_sample, np.concatenate(states, axis=1), settings)
    return np.split(finals.astype(network.dtype), sizes, axis=1), steps, residuals, None


def relax_reference(network: Network, x, settings: RelaxSettings, target, initial, record: bool) -> RelaxResult:
    """The reference implementation behind ``relax(..., backend="numpy")`` and ``method="solve_ivp"``."""
    states = network.zero_states(x.shape[0]) if initial is None else [s.copy() for s in initial]
    if settings.method == "solve_ivp":
        if record:
            raise ValueError("record=True is not available for method='solve_ivp'")
        run = _relax_solve_ivp
    elif settings.method == "rk45":
        run = _relax_rk45
    else:
        run = _relax_fixed_point
    states, steps, residual, frames = run(network, x, settings, target, states, record)
    residual = np.asarray(residual, dtype=np.float64)
    diverged = ~np.isfinite(residual) | ~np.all(np.isfinite(np.concatenate(states, axis=1)), axis=1)
    result = RelaxResult([np.ascontiguousarray(s, dtype=network.dtype) for s in states], steps, residual,
                         residual < settings.tol, diverged, settings)
    if record:
        result.trajectory = [np.stack([frame[k] for frame in frames]) for k in range(len(network.state_sizes))]
    return result
