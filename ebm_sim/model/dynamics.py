"""Relaxation of a layered network, written once over backends (numpy reference, numba, torch on CPU/CUDA).

The methods, their updates, residuals and step rules are the one table of :mod:`ebm_sim.integrators`: the fixed-step
family (euler, fixed_point, alternating) on every interaction backend; rk45 and solve_ivp are
:mod:`ebm_sim.reference`'s solvers (``rk45_packed``, ``solve_ivp_packed``) on the packed states (numpy backend). Each
sample stops when its residual is below tol (per_sample=True: it is frozen while the others go on) or at max_steps;
tol = 0 runs exactly max_steps steps. record=True (fixed-step methods) keeps the states after every step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import integrators
from ..deployment import resolve as resolve_deployment
from ..relax_types import MAX_TRAJECTORY_BYTES
from .energy import clamped_fields, energy, local_fields, parameters, prepare
from .interaction import array_ops


@dataclass
class LayeredRelaxResult:
    """states: list of (B, *shape_k); steps (B,) per sample; residual (B,); converged (B,) residual < tol;
    output_update: the last layer's last update before the clip (s_L = clip(output_update, 0, 1) exactly).
    With record=True: trajectory, list of L arrays (T+1, B, *shape_k), the states before the first step and after
    every step (T = the most steps any sample took; a sample that stopped keeps its state), and energy (T+1, B),
    E + beta C of every frame."""

    states: list
    steps: object
    residual: object
    converged: object
    output_update: object = None
    trajectory: list | None = None
    energy: object = None


def relax(network, x, method: str = "fixed_point", tol: float = 1e-4, max_steps: int = 1000, dt=None,
          beta: float = 0.0, target=None, initial=None, params=None, per_sample: bool = True,
          deployment=None, record: bool = False) -> LayeredRelaxResult:
    """Relax images x (B, *input_shape) to a fixed point of a LayeredNetwork with ``params`` (numpy by default;
    torch tensors from ``energy.parameters(network, "torch", ...)`` relax on their device, differentiably if they or
    x require grad and grad mode is on). The clamped layer is s_0 = network.normalize(x). deployment: an
    ``ebm_sim.deployment.Deployment`` that supplies method, tol, max_steps and dt (leave those at their defaults).
    record: keep every step's states and energy (``LayeredRelaxResult.trajectory``, ``.energy``; fixed-step methods,
    at most ``relax_types.MAX_TRAJECTORY_BYTES``)."""
    method, tol, max_steps, dt = resolve_deployment(deployment, relax, method, tol, max_steps, dt)
    return relax_clamped(network, network.normalize(x), method, tol, max_steps, dt, beta, target, initial, params,
                         per_sample, record)


def relax_clamped(network, x, method: str = "fixed_point", tol: float = 1e-4, max_steps: int = 1000, dt=None,
                  beta: float = 0.0, target=None, initial=None, params=None,
                  per_sample: bool = True, record: bool = False) -> LayeredRelaxResult:
    """``relax`` with x already the clamped layer s_0 (normalized)."""
    backend = "numpy" if params is None else params.backend
    integrator = integrators.get(method, "layered", backend, f"a layered network on the {backend} backend")
    if x.shape[1:] != network.input_shape:
        raise ValueError(f"inputs have shape {tuple(x.shape[1:])}, the network's input layer {network.input_shape}")
    if record:
        _check_recordable(network, integrator, x.shape[0], max_steps)
    if integrator.adaptive:
        return _relax_adaptive(network, x, method, tol, max_steps, dt, beta, target, initial, params)
    dt = integrator.resolve_dt(dt)
    params = prepare(network, parameters(network) if params is None else params, x.shape[0])
    ops = array_ops(params.backend)
    a = network.slope
    if initial is None:
        states = [ops.zeros((x.shape[0],) + shape, x) for shape in network.state_shapes]
    else:
        states = [ops.copy(s) for s in initial]
    batch = x.shape[0]
    active = ops.ones_bool(batch, x)
    steps = ops.zeros_int(batch, x)
    residual = ops.full(batch, float("inf"), x)
    update = ops.copy(states[-1])
    clamped = clamped_fields(network, x, params)
    groups = integrator.update_groups(network.num_layers)
    retire = per_sample and ops.retires
    frames = [[ops.copy(s) for s in states]] if record else None
    memo = {}  # each interaction's last forward (convolution, routing) with its s_pre: local_fields
    for _ in range(max_steps):
        if retire and not ops.all(active):  # step only the samples still running, then write them back
            memo = None  # (the states below change in place)
            rows = ops.nonzero(active)
            new, raw, change = _step(network, groups, x[rows], [s[rows] for s in states], beta,
                                     None if target is None else target[rows], params,
                                     [None if c is None else c[rows] for c in clamped], a, dt, ops)
            for s, n in zip(states, new):  # the relaxation's own arrays (zeros, copies, or results of where)
                s[rows] = n
            update[rows], residual[rows] = raw, change
        else:
            new, raw, change = _step(network, groups, x, states, beta, target, params, clamped, a, dt, ops, memo)
            if per_sample and not ops.all(active):  # (all running: the new states themselves, as the memo knows them)
                states = [ops.where(active, n, s) for n, s in zip(new, states)]
                update, residual = ops.where(active, raw, update), ops.where(active, change, residual)
            else:
                states, update, residual = new, raw, change
        steps = steps + active
        if record:
            frames.append([ops.copy(s) for s in states])
        if per_sample:
            active = active & ~(residual < tol) & ops.isfinite(residual)
            if not ops.any(active):
                break
        elif not ops.any(~(residual < tol)):
            break
    result = LayeredRelaxResult(states, steps, residual, residual < tol, update)
    if record:
        result.trajectory = [ops.stack([frame[k] for frame in frames]) for k in range(network.num_layers)]
        result.energy = ops.stack([energy(network, x, frame, beta, target, params) for frame in frames])
    return result


def _check_recordable(network, integrator, batch: int, max_steps: int) -> None:
    """Recording needs a fixed-step method and at most MAX_TRAJECTORY_BYTES for (max_steps + 1) frames: ValueError
    before any step otherwise."""
    if integrator.adaptive:
        raise ValueError(f"record=True keeps the states of every fixed step; {integrator.name!r} adapts its steps: "
                         f"record with {', '.join(n for n, i in integrators.INTEGRATORS.items() if not i.adaptive)}")
    size = (max_steps + 1) * batch * sum(int(np.prod(s)) for s in network.state_shapes) * network.dtype.itemsize
    if size > MAX_TRAJECTORY_BYTES:
        raise ValueError(f"recording {max_steps + 1} frames of {batch} samples needs {size / 2 ** 30:.1f} GiB "
                         f"(at most {MAX_TRAJECTORY_BYTES / 2 ** 30:.0f}); lower max_steps or the batch size")


def _step(network, groups, x, states, beta, target, params, clamped, a, dt, ops, memo=None) -> tuple:
    """One step of the fixed-step family on these samples: (new states, the last layer's update before the clip,
    max |s_{t+1} - s_t| / dt per sample); ``groups``: the layers updated together, in order; ``memo``: the
    relaxation's memo of forwards (``local_fields``)."""
    states = list(states)
    change = ops.full(x.shape[0], 0.0, x)
    last = network.num_layers - 1
    update = None
    for group in groups:
        fields = local_fields(network, x, states, beta, target, params, layers=group, clamped=clamped, memo=memo)
        for k in group:
            raw = a * fields[k] if dt == 1.0 else states[k] + dt * (a * fields[k] - states[k])
            new = ops.clip(raw, 0.0, 1.0)
            change = ops.maximum(change, ops.max_abs(new - states[k]))
            states[k] = new
            if k == last:
                update = raw
    return states, update, change / dt


def _relax_adaptive(network, x, method, tol, max_steps, dt, beta, target, initial, params) -> LayeredRelaxResult:
    """rk45 / solve_ivp on the packed states (numpy backend): the dense reference's solvers with the layered flow."""
    import numpy as np

    from ..energy import projected_velocity
    from ..reference import rk45_packed, solve_ivp_packed
    from ..relax_types import RelaxSettings
    from .energy import velocity

    settings = RelaxSettings(method=method, tol=tol, max_steps=max_steps, dt=dt, beta=beta, backend="numpy")
    shapes = network.state_shapes
    sizes = np.cumsum([int(np.prod(shape)) for shape in shapes])[:-1]

    def unpack(flat, batch):
        return [part.reshape((batch,) + shape) for part, shape in zip(np.split(flat, sizes, axis=1), shapes)]

    def packed_flow(net, xb, tb, flat):
        states = unpack(flat, flat.shape[0])
        flows = projected_velocity(states, velocity(net, xb, states, beta, tb))
        return np.concatenate([f.reshape(f.shape[0], -1) for f in flows], axis=1)

    start = network.zero_states(x.shape[0]) if initial is None else initial
    packed = np.concatenate([st.reshape(x.shape[0], -1) for st in start], axis=1)
    if method == "rk45":
        final, steps, residual, _ = rk45_packed(lambda flat: packed_flow(network, x, target, flat), packed, settings,
                                                False)
    else:
        net64, x64 = network.astype(np.float64), x.astype(np.float64)

        def rhs_of_sample(b):
            tb = None if target is None else np.asarray(target[b:b + 1], dtype=np.float64)
            return lambda flat: packed_flow(net64, x64[b:b + 1], tb, flat[None, :])[0]

        final, steps, residual = solve_ivp_packed(rhs_of_sample, packed, settings)
    states = [s.astype(network.dtype) for s in unpack(final, x.shape[0])]
    residual = np.asarray(residual, dtype=np.float64)
    return LayeredRelaxResult(states, steps, residual, residual < tol, None)
