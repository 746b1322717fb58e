"""Glue between :func:`ebm_sim.relax.relax` and the Numba kernels: packing, output arrays, unpacking."""
from __future__ import annotations

import numpy as np

from . import kernels
from .blas import make_handle
from .network import Network
from .relax import RelaxResult, RelaxSettings


def column_offsets(network: Network) -> np.ndarray:
    """col[i] = n_1 + ... + n_i: where layer i (0-based, s_{i+1}) starts in the packed (B, N) state buffer."""
    return np.concatenate([[0], np.cumsum(network.layer_sizes[1:-1])]).astype(np.int64)


def pack_states(states) -> np.ndarray:
    """List of (B, n_k) -> one row-major (B, N) buffer."""
    return np.ascontiguousarray(np.concatenate(states, axis=1))


def unpack_states(packed: np.ndarray, network: Network) -> list:
    """(…, N) buffer -> list of (…, n_k) arrays (copies)."""
    bounds = np.cumsum(network.layer_sizes[1:])[:-1]
    return [np.ascontiguousarray(part) for part in np.split(packed, bounds, axis=-1)]


def relax_numba(network: Network, x, settings: RelaxSettings, target, initial, record: bool) -> RelaxResult:
    """Run the kernel of ``settings.method`` on a validated batch (see :func:`ebm_sim.relax.relax`)."""
    batch, dtype = x.shape[0], network.dtype
    width = sum(network.layer_sizes[1:])
    start = np.zeros((batch, width), dtype=dtype) if initial is None else pack_states(initial)
    if target is None:
        target = np.zeros((batch, network.layer_sizes[-1]), dtype=dtype)
    weights = tuple(network.weights)
    biases = np.concatenate(network.biases)
    col = column_offsets(network)
    trajectory = (np.empty((settings.max_steps + 1, batch, width), dtype=dtype) if record
                  else np.empty((1, 1, 1), dtype=dtype))
    out_states = np.empty((batch, width), dtype=dtype)
    out_steps = np.zeros(batch, dtype=np.int64)
    out_residual = np.zeros(batch, dtype=np.float64)
    out_converged = np.zeros(batch, dtype=np.bool_)
    out_diverged = np.zeros(batch, dtype=np.bool_)
    outputs = (out_states, out_steps, out_residual, out_converged, out_diverged)
    slope = float(network.slope)
    if settings.method == "rk45":
        kernels.relax_rk45(make_handle(dtype), x, weights, biases, col, slope, settings.beta, target, start, settings.tol,
                           settings.max_steps, settings.rtol, settings.atol, settings.dt, settings.dt_max,
                           record, trajectory, *outputs)
    else:
        kernels.relax_fixed_point(make_handle(dtype), x, weights, biases, col, slope, float(settings.dt),
                                  settings.method == "alternating", settings.beta, target, start, settings.tol,
                                  settings.max_steps, record, trajectory, *outputs)
    result = RelaxResult(unpack_states(out_states, network), out_steps, out_residual, out_converged,
                         out_diverged, settings)
    if record:
        frames = int(out_steps.max()) + 1
        trajectory = trajectory[:frames]
        for sample, last in enumerate(out_steps):  # a retired sample keeps its final state
            trajectory[last + 1:, sample] = trajectory[last, sample]
        result.trajectory = unpack_states(trajectory, network)
    return result
