"""Relaxation of a layered network, written once over backends (numpy reference, torch on CPU/CUDA).

    "euler"        s <- clip(s + dt (a h - s), 0, 1)                       residual max |s_{t+1} - s_t| / dt
    "fixed_point"  s <- clip(a h, 0, 1) (Euler with dt = 1), all layers from the same states (synchronous)
    "alternating"  the same update, layers s_1, s_3, ... first, then s_2, s_4, ... from the new odd layers
The rule is :mod:`ebm_sim.relax`'s: each sample stops when its residual is below tol (per_sample=True: it is frozen
while the others go on) or at max_steps; tol = 0 runs exactly max_steps steps. Methods and default steps: the
simulator's one table (``ebm_sim.relax.DEFAULT_DT``).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..relax import DEFAULT_DT
from .energy import clamped_fields, local_fields, parameters
from .interaction import array_ops

LAYERED_METHODS = ("euler", "fixed_point", "alternating")


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
    dt = DEFAULT_DT[method] if dt is None else dt
    if method != "euler" and dt != 1.0:
        raise ValueError(f"{method} is the dt = 1 update; use euler for dt = {dt}")
    if not 0 < dt <= 1:
        raise ValueError(f"dt must be in (0, 1], got {dt}")
    params = parameters(network) if params is None else params
    ops = array_ops(params.backend)
    a = network.slope
    if initial is None:
        states = [x.new_zeros((x.shape[0],) + shape) if hasattr(x, "new_zeros") else
                  network.zero_states(x.shape[0])[k].astype(x.dtype) for k, shape in enumerate(network.state_shapes)]
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
