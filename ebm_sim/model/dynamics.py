"""Relaxation of a layered network, written once over backends (numpy reference, torch on CPU/CUDA).

    "euler"        s <- clip(s + dt (a h - s), 0, 1)                       residual max |s_{t+1} - s_t| / dt
    "fixed_point"  s <- clip(a h, 0, 1) (Euler with dt = 1), all layers from the same states (synchronous)
    "alternating"  the same update, layers s_1, s_3, ... first, then s_2, s_4, ... from the new odd layers
    "rk45"         adaptive Dormand-Prince 5(4) on the projected flow P(a h - s) (numpy backend)
    "solve_ivp"    SciPy's RK45 on the projected flow, float64, one sample at a time (numpy backend; slow reference)
The adaptive methods are :mod:`ebm_sim.reference`'s (``rk45_packed``, ``solve_ivp_packed``) on the packed states.
The rule is :mod:`ebm_sim.relax`'s: each sample stops when its residual is below tol (per_sample=True: it is frozen
while the others go on) or at max_steps; tol = 0 runs exactly max_steps steps. Methods and default steps: the
simulator's one table (``ebm_sim.relax.DEFAULT_DT``).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..relax import DEFAULT_DT
from .energy import clamped_fields, local_fields, parameters
from .interaction import array_ops

LAYERED_METHODS = ("euler", "fixed_point", "alternating", "rk45", "solve_ivp")
ADAPTIVE = ("rk45", "solve_ivp")


@dataclass
class LayeredRelaxResult:
    """states: list of (B, *shape_k); steps (B,) per sample; residual (B,); converged (B,) residual < tol;
    output_update: the last layer's last update before the clip (s_L = clip(output_update, 0, 1) exactly)."""

    states: list
    steps: object
    residual: object
    converged: object
    output_update: object = None


def update_groups(method: str, num_layers: int) -> list:
    """0-based state indices updated together: all at once, or the odd layers s_1, s_3, ... then the even ones."""
    if method == "alternating":
        return [list(range(0, num_layers, 2)), list(range(1, num_layers, 2))]
    return [list(range(num_layers))]


def relax(network, x, method: str = "fixed_point", tol: float = 1e-4, max_steps: int = 1000, dt=None,
          beta: float = 0.0, target=None, initial=None, params=None, per_sample: bool = True) -> LayeredRelaxResult:
    """Relax images x (B, *input_shape) to a fixed point of a LayeredNetwork with ``params`` (numpy by default;
    torch tensors from ``energy.parameters(network, "torch", ...)`` relax on their device, differentiably if they or
    x require grad and grad mode is on). The clamped layer is s_0 = network.normalize(x)."""
    return relax_clamped(network, network.normalize(x), method, tol, max_steps, dt, beta, target, initial, params,
                         per_sample)


def relax_clamped(network, x, method: str = "fixed_point", tol: float = 1e-4, max_steps: int = 1000, dt=None,
                  beta: float = 0.0, target=None, initial=None, params=None,
                  per_sample: bool = True) -> LayeredRelaxResult:
    """``relax`` with x already the clamped layer s_0 (normalized)."""
    if method not in LAYERED_METHODS:
        raise ValueError(f"a layered network relaxes with {', '.join(LAYERED_METHODS)}, not {method!r}")
    if x.shape[1:] != network.input_shape:
        raise ValueError(f"inputs have shape {tuple(x.shape[1:])}, the network's input layer {network.input_shape}")
    if method in ADAPTIVE:
        return _relax_adaptive(network, x, method, tol, max_steps, dt, beta, target, initial, params)
    dt = DEFAULT_DT[method] if dt is None else dt
    if method != "euler" and dt != 1.0:
        raise ValueError(f"{method} is the dt = 1 update; use euler for dt = {dt}")
    if not 0 < dt <= 1:
        raise ValueError(f"dt must be in (0, 1], got {dt}")
    params = parameters(network) if params is None else params
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
    last = network.num_layers - 1
    update = states[last]
    clamped = clamped_fields(network, x, params)
    for _ in range(max_steps):
        change = ops.full(batch, 0.0, x)
        for group in update_groups(method, network.num_layers):
            fields = local_fields(network, x, states, beta, target, params, layers=group, clamped=clamped)
            for k in group:
                raw = a * fields[k] if dt == 1.0 else states[k] + dt * (a * fields[k] - states[k])
                new = ops.clip(raw, 0.0, 1.0)
                change = ops.maximum(change, ops.max_abs(new - states[k]))
                states[k] = ops.where(active, new, states[k]) if per_sample else new
                if k == last:
                    update = ops.where(active, raw, update) if per_sample else raw
        change = change / dt
        residual = ops.where(active, change, residual) if per_sample else change
        steps = steps + active
        if per_sample:
            active = active & ~(residual < tol) & ops.isfinite(residual)
            if not ops.any(active):
                break
        elif not ops.any(~(residual < tol)):
            break
    return LayeredRelaxResult(states, steps, residual, residual < tol, update)


def _relax_adaptive(network, x, method, tol, max_steps, dt, beta, target, initial, params) -> LayeredRelaxResult:
    """rk45 / solve_ivp on the packed states (numpy backend): the dense reference's solvers with the layered flow."""
    import numpy as np

    from ..energy import projected_velocity
    from ..reference import rk45_packed, solve_ivp_packed
    from ..relax import RelaxSettings
    from .energy import velocity

    if params is not None and params.backend != "numpy":
        raise ValueError(f"{method} runs on the numpy backend, not {params.backend}")
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
