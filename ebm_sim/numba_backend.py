"""Glue between :func:`ebm_sim.relax.relax` and the Numba kernels: packing, output arrays, unpacking."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import kernels
from .blas import make_handle, single_threaded
from .network import Network
from .relax_types import RelaxResult, RelaxSettings


def column_offsets(network: Network) -> np.ndarray:
    """col[i] = n_1 + ... + n_i: where layer i (0-based, s_{i+1}) starts in the packed (B, N) state buffer."""
    return np.concatenate([[0], np.cumsum(network.state_sizes[:-1])]).astype(np.int64)


def pack_states(states) -> np.ndarray:
    """List of (B, n_k) -> one row-major (B, N) buffer."""
    return np.ascontiguousarray(np.concatenate(states, axis=1))


def unpack_states(packed: np.ndarray, network: Network) -> list:
    """(…, N) buffer -> list of (…, n_k) arrays (copies)."""
    bounds = np.cumsum(network.state_sizes)[:-1]
    return [np.ascontiguousarray(part) for part in np.split(packed, bounds, axis=-1)]


MIN_ROWS_PER_THREAD = 32


def worker_count(batch: int, threads: int | None) -> int:
    """Threads for a batch: one per available core (or ``threads``), each with at least MIN_ROWS_PER_THREAD rows."""
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not (isinstance(threads, (int, np.integer)) and threads >= 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    return max(1, min(int(threads), batch // MIN_ROWS_PER_THREAD))


def relax_numba(network: Network, x, settings: RelaxSettings, target, initial, record: bool,
                threads: int | None = None) -> RelaxResult:
    """Run the kernel of ``settings.method`` on a validated batch (see :func:`ebm_sim.relax.relax`).

    Samples relax independently, so the batch is split into contiguous chunks, one per worker thread, and each
    chunk runs the whole kernel (its own early stopping) with single-threaded BLAS: no synchronisation at all
    between workers during the relaxation. With record=True one worker runs (recording is for analysis).
    """
    batch, dtype = x.shape[0], network.dtype
    width = sum(network.state_sizes)
    start = np.zeros((batch, width), dtype=dtype) if initial is None else pack_states(initial)
    if target is None:
        target = np.zeros((batch, network.layer_sizes[-1]), dtype=dtype)
    dynamic = network.dynamics()
    weights = tuple(dynamic.weights)
    biases = np.concatenate(dynamic.biases)
    readout = network.readout_layer()
    readout_w, readout_b = readout if readout else (np.empty((0, width), dtype=dtype), np.empty(0, dtype=dtype))
    col = column_offsets(dynamic)
    trajectory = (np.empty((settings.max_steps + 1, batch, width), dtype=dtype) if record
                  else np.empty((1, 1, 1), dtype=dtype))
    outputs = (np.empty((batch, width), dtype=dtype), np.zeros(batch, dtype=np.int64),
               np.zeros(batch, dtype=np.float64), np.zeros(batch, dtype=np.bool_), np.zeros(batch, dtype=np.bool_))
    slope = float(network.slope)

    def run_chunk(rows: slice):
        chunk_outputs = [out[rows] for out in outputs]
        if settings.method == "rk45":
            kernels.relax_rk45(make_handle(dtype), x[rows], weights, biases, col, slope, settings.beta,
                               target[rows], readout_w, readout_b, start[rows], settings.tol, settings.max_steps, settings.rtol,
                               settings.atol, settings.dt, settings.dt_max, record, trajectory, *chunk_outputs)
        else:
            kernels.relax_fixed_point(make_handle(dtype), x[rows], weights, biases, col, slope, float(settings.dt),
                                      settings.method == "alternating", settings.beta, target[rows], readout_w,
                                      readout_b, start[rows],
                                      settings.tol, settings.max_steps, record, trajectory, *chunk_outputs)

    workers = 1 if record else worker_count(batch, threads)
    bounds = np.linspace(0, batch, workers + 1).astype(int)
    chunks = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    with single_threaded:
        if workers == 1:
            run_chunk(chunks[0])
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(run_chunk, chunks))  # list(): re-raise a worker's exception here
    out_states, out_steps, out_residual, out_converged, out_diverged = outputs
    result = RelaxResult(unpack_states(out_states, network), out_steps, out_residual, out_converged,
                         out_diverged, settings)
    if record:
        frames = int(out_steps.max()) + 1
        trajectory = trajectory[:frames]
        for sample, last in enumerate(out_steps):  # a retired sample keeps its final state
            trajectory[last + 1:, sample] = trajectory[last, sample]
        result.trajectory = unpack_states(trajectory, network)
    return result
