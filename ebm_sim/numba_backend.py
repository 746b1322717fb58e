"""Glue between :func:`ebm_sim.relax.relax` and the Numba kernels: packing, output arrays, unpacking."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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
    parts, start = [], 0
    for size in network.state_sizes:  # slices, not np.split: this runs after every phase of an EP step
        parts.append(np.ascontiguousarray(packed[..., start:start + size]))
        start += size
    return parts


MIN_ROWS_PER_THREAD = 32


def worker_count(batch: int, threads: int | None, min_rows: int = MIN_ROWS_PER_THREAD) -> int:
    """Threads for a batch: one per available core (or ``threads``), each with at least ``min_rows`` rows."""
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not (isinstance(threads, (int, np.integer)) and threads >= 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    return max(1, min(int(threads), batch // min_rows))


_POOLS = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads, made once (a pool per call costs about 0.1 ms, which the EP step
    of a 50-sample minibatch, about 1 ms, cannot afford). Work submitted to it must not wait on the same pool."""
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"ebm-numba{workers}")
        return pool


@dataclass(frozen=True)
class KernelArrays:
    """A dense network as the kernels take it (views of its arrays where they can be: an optimizer's in-place updates
    are seen): weights (W_0 .. W_{L-1}, the readout's excluded), biases flat (N,) (a copy: rebuild after an update),
    col (L,), readout_w (classes, n_L) and readout_b (classes,) or arrays with no rows, slope a, dtype, width N."""

    weights: tuple
    biases: np.ndarray
    col: np.ndarray
    readout_w: np.ndarray
    readout_b: np.ndarray
    slope: float
    dtype: np.dtype
    width: int

    @classmethod
    def of(cls, network: Network) -> "KernelArrays":
        dynamic = network.dynamics()
        dtype, width = network.dtype, sum(network.state_sizes)
        readout = network.readout_layer()
        readout_w, readout_b = readout if readout else (np.empty((0, width), dtype=dtype), np.empty(0, dtype=dtype))
        return cls(tuple(dynamic.weights), np.concatenate(dynamic.biases), column_offsets(dynamic), readout_w,
                   readout_b, float(network.slope), dtype, width)

    def input_projection(self, x) -> np.ndarray:
        """X1 = x W_0^T + b_1 (B, n_1): what the kernels take instead of x (single-threaded BLAS, as the kernels)."""
        with single_threaded:
            return kernels.input_projection(make_handle(self.dtype), x, self.weights[0],
                                            self.biases[:self.weights[0].shape[0]])


def relax_numba(network: Network, x, settings: RelaxSettings, target, initial, record: bool,
                threads: int | None = None, x_proj=None, arrays: KernelArrays | None = None,
                min_rows: int = MIN_ROWS_PER_THREAD) -> RelaxResult:
    """Run the kernel of ``settings.method`` on a validated batch (see :func:`ebm_sim.relax.relax`).

    Samples relax independently, so the batch is split into contiguous chunks, one per worker thread, and each
    chunk runs the whole kernel (its own early stopping) with single-threaded BLAS: no synchronisation at all
    between workers during the relaxation. With record=True one worker runs (recording is for analysis).
    x_proj: the inputs' ``KernelArrays.input_projection`` when the caller has it (the phases of an EP step share
    one); arrays: ``KernelArrays.of(network)`` when the caller has it; min_rows: the fewest rows per worker.
    """
    arrays = arrays or KernelArrays.of(network)
    batch, dtype, width = x.shape[0], arrays.dtype, arrays.width
    start = np.zeros((batch, width), dtype=dtype) if initial is None else pack_states(initial)
    if target is None:
        target = np.zeros((batch, network.layer_sizes[-1]), dtype=dtype)
    if x_proj is None:
        x_proj = arrays.input_projection(x)
    weights, biases, col, slope = arrays.weights, arrays.biases, arrays.col, arrays.slope
    readout_w, readout_b = arrays.readout_w, arrays.readout_b
    trajectory = (np.empty((settings.max_steps + 1, batch, width), dtype=dtype) if record
                  else np.empty((1, 1, 1), dtype=dtype))
    outputs = (np.empty((batch, width), dtype=dtype), np.zeros(batch, dtype=np.int64),
               np.zeros(batch, dtype=np.float64), np.zeros(batch, dtype=np.bool_), np.zeros(batch, dtype=np.bool_))

    def run_chunk(rows: slice):
        chunk_outputs = [out[rows] for out in outputs]
        if settings.method == "rk45":
            kernels.relax_rk45(make_handle(dtype), x_proj[rows], weights, biases, col, slope, settings.beta,
                               target[rows], readout_w, readout_b, start[rows], settings.tol, settings.max_steps,
                               settings.rtol, settings.atol, settings.dt, settings.dt_max, record, trajectory,
                               *chunk_outputs)
        else:
            kernels.relax_fixed_point(make_handle(dtype), x_proj[rows], weights, biases, col, slope,
                                      float(settings.dt), settings.method == "alternating", settings.beta,
                                      target[rows], readout_w, readout_b, start[rows], settings.tol,
                                      settings.max_steps, record, trajectory, *chunk_outputs)

    workers = 1 if record else worker_count(batch, threads, min_rows)
    with single_threaded:
        if workers == 1:
            run_chunk(slice(0, batch))
        else:
            bounds = np.linspace(0, batch, workers + 1).astype(int)
            chunks = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
            list(shared_pool(workers).map(run_chunk, chunks))  # list(): re-raise a worker's exception here
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
