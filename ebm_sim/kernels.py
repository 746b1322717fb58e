"""Numba kernels: the relaxation of a batch to equilibrium, with no allocation per step.

The equations are those of :mod:`ebm_sim.energy` (see its docstring); this module only makes them fast.

Layout. The states of layers 1..L of a batch live in one row-major buffer S of shape (B, N), N = n_1 + ... + n_L;
layer i (0-based, i.e. s_{i+1}) occupies columns ``col[i] : col[i] + n_{i+1}``. A layer is a column block with row
stride N, which BLAS takes directly (the leading dimension), so no per-layer copies are made. The field buffer H has
the same layout. The input never changes during a relaxation, so its projection X1 = x W_0^T + b_1 is computed once
(``input_projection``), by the caller: the kernels take X1, not x, so that the phases of an EP step, which relax the
same inputs, share one projection.

Early stopping. Samples that meet the tolerance are retired at once: their row is written to the output and the last
active row is moved into its place, so every later matrix product runs on the still-active rows only.

Kernels:
- ``relax_fixed_point``: explicit Euler s <- clip(s + dt (a h - s)), synchronous (all layers from the old state)
  or alternating (layers s_1, s_3, ... then s_2, s_4, ..., each from the newest neighbours); dt = 1 is the
  fixed-point iteration s <- clip(a h) = rho(dPhi/ds). Residual: max |s_{t+1} - s_t| / dt.
- ``relax_rk45``: adaptive Dormand-Prince 5(4) on the projected flow, per-sample step size with error control,
  states projected after every accepted step. Residual: max |projected ds/dt| at the current state.
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from .blas import rows_t_times, rows_times_w, rows_times_wt
from .integrators import DORMAND_PRINCE


def _bits(a):
    """The same memory as unsigned integers of the same width (uint32 for float32, uint64 for float64)."""
    raise NotImplementedError("only callable from Numba-compiled code")


@overload(_bits)
def _bits_impl(a):
    unsigned = np.uint32 if a.dtype == types.float32 else np.uint64
    return lambda a: a.view(unsigned)


@njit(cache=True, inline="always")
def _nan_max(a, b):
    """max(a, b), NaN if either is NaN."""
    if a != a or b != b:
        return a + b
    return a if a > b else b

# ------------------------------------------------------------------------------------------------ fields


SKINNY_ROWS = 16  # a coupling W_k (k >= 1) with at most this many rows (e.g. a 10-unit output layer): see below


@njit(cache=True, inline="always")
def _skinny(W):
    return W.shape[0] <= SKINNY_ROWS


@njit(cache=True)
def _coupling(i, S, H, rows, weights, col, blas, skip_skinny=False):
    """H[:rows, layer i] = s_i W_i^T (from the layer below, i >= 1) + s_{i+2} W_{i+1} (from above, i < L-1).

    The input term of layer 0 and the biases are added later by ``_finish_field`` (they are constant).
    skip_skinny: leave out the terms of skinny couplings (``_skinny_couplings`` adds both directions of those).
    Up to SMALL_BATCH rows: fused loops (``_coupling_rows``); more: SciPy's GEMM.
    """
    if rows <= SMALL_BATCH:
        _coupling_rows(i, S, H, rows, weights, col, skip_skinny)
        return
    num_layers = len(weights)
    itemsize = S.itemsize
    width = S.shape[1]
    n_i = weights[i].shape[0]
    h_ptr = H.ctypes.data + col[i] * itemsize
    written = False
    if i >= 1 and not (skip_skinny and _skinny(weights[i])):
        rows_times_wt(blas, rows, S.ctypes.data + col[i - 1] * itemsize, width, weights[i].shape[1],
                      weights[i].ctypes.data, n_i, h_ptr, width, False)
        written = True
    if i < num_layers - 1 and not (skip_skinny and _skinny(weights[i + 1])):
        rows_times_w(blas, rows, S.ctypes.data + col[i + 1] * itemsize, width, weights[i + 1].shape[0],
                     weights[i + 1].ctypes.data, n_i, h_ptr, width, written)
        written = True
    if not written:
        H[:rows, col[i]:col[i] + n_i] = 0.0


@njit(cache=True)
def _coupling_rows(i, S, H, rows, weights, col, skip_skinny):
    """``_coupling`` for a few rows (at most SMALL_BATCH) without BLAS: per row, layer i's field from below by
    ``_matvec_rows`` and from above by ``_add_transposed_rows``, each one pass over its W. A GEMM call with one row
    can be ten times slower than these loops (SciPy's OpenBLAS ran a 1 x 512 x 512 product at 4.2-4.7 GFLOP/s on
    2026-12-03, 50 on 2026-11-23; the loops' speed does not depend on the BLAS build)."""
    num_layers = len(weights)
    n_i = weights[i].shape[0]
    below_used = i >= 1 and not (skip_skinny and _skinny(weights[i]))
    above_used = i < num_layers - 1 and not (skip_skinny and _skinny(weights[i + 1]))
    for r in range(rows):
        h = H[r, col[i]:col[i] + n_i]
        if below_used:
            _matvec_rows(weights[i], S[r, col[i - 1]:col[i - 1] + weights[i].shape[1]], h)
        else:
            h[:] = 0.0
        if above_used:
            W = weights[i + 1]
            _add_transposed_rows(W, S[r, col[i + 1]:col[i + 1] + W.shape[0]], h)


@njit(cache=True, fastmath=True, nogil=True)
def _add_transposed_rows(W, v, out):
    """out += W^T v for W (n_out, n_in), v (n_out,), out (n_in,): four rows of W per pass over ``out``."""
    n_out, n_in = W.shape
    o = 0
    while o + 4 <= n_out:
        a0, a1, a2, a3 = v[o], v[o + 1], v[o + 2], v[o + 3]
        for j in range(n_in):
            out[j] += W[o, j] * a0 + W[o + 1, j] * a1 + W[o + 2, j] * a2 + W[o + 3, j] * a3
        o += 4
    while o < n_out:
        a0 = v[o]
        for j in range(n_in):
            out[j] += W[o, j] * a0
        o += 1


@njit(cache=True, inline="always")
def _layer_constant(i, r, c0, n_i, x_proj, biases):
    """The constant part of layer i's field for active row r: x W_0^T + b_1 (i = 0) or b_{i+1}."""
    if i == 0:
        return x_proj[r, :]
    return biases[c0:c0 + n_i]


@njit(cache=True)
def _apply_nudge(S, H, rows, c0, n_i, nudge):
    """h_L <- h_L - beta dC/ds_L on the last state layer (columns c0 : c0 + n_i). ``nudge`` = (beta, target,
    readout_w, readout_b). Without a readout (readout_w has no rows) C = 1/2 ||s_L - y||^2 and dC/ds_L = s_L - y;
    with one, C = cross-entropy of softmax(W_r s_L + b_r) against y and dC/ds_L = W_r^T (softmax(...) - y)."""
    beta, target, readout_w, readout_b = nudge
    if beta == 0.0:
        return
    if readout_w.shape[0] == 0:
        for r in range(rows):
            for j in range(n_i):
                H[r, c0 + j] -= beta * (S[r, c0 + j] - target[r, j])
        return
    classes = readout_w.shape[0]
    error = np.empty(classes, dtype=np.float64)
    for r in range(rows):
        for c in range(classes):
            total = float(readout_b[c])
            for j in range(n_i):
                total += readout_w[c, j] * S[r, c0 + j]
            error[c] = total
        largest = error.max()
        norm = 0.0
        for c in range(classes):
            error[c] = np.exp(error[c] - largest)
            norm += error[c]
        for c in range(classes):
            error[c] = error[c] / norm - target[r, c]
        for j in range(n_i):
            pull = 0.0
            for c in range(classes):
                pull += readout_w[c, j] * error[c]
            H[r, c0 + j] -= beta * pull


@njit(cache=True)
def _finish_field(i, S, H, rows, num_layers, col, n_i, x_proj, biases, nudge):
    """Add the constant terms to layer i's field and, on the last state layer, the nudge."""
    c0 = col[i]
    for r in range(rows):
        constant = _layer_constant(i, r, c0, n_i, x_proj, biases)
        for j in range(n_i):
            H[r, c0 + j] += constant[j]
    if i == num_layers - 1:
        _apply_nudge(S, H, rows, c0, n_i, nudge)


@njit(cache=True)
def _field(i, S, H, rows, weights, col, blas, x_proj, biases, nudge):
    """Layer i's full local field h = dPhi/ds (nudged on the output layer) into H, from the states in S."""
    _coupling(i, S, H, rows, weights, col, blas)
    _finish_field(i, S, H, rows, len(weights), col, weights[i].shape[0], x_proj, biases, nudge)


@njit(cache=True, inline="always")
def _advance(old, h, a, step, fixed_point, zero, one):
    """(|new - old|, new) with new = clip(old + step (a h - old), 0, 1), or clip(a h) for the fixed-point map;
    NaN stays NaN (it is the first argument of max and min)."""
    new = a * h if fixed_point else old + step * (a * h - old)
    new = min(max(new, zero), one)
    return abs(new - old), new


@njit(cache=True)
def _euler_update(i, S, H, rows, num_layers, col, n_i, x_proj, biases, nudge, slope, dt, residual):
    """Layer i: h = coupling (in H) + constant terms (+ nudge), then s <- clip(s + dt (a h - s), 0, 1), or
    clip(a h) when dt == 1; residual[r] = max(residual[r], max_j |change|). No allocation; NaN is kept (and so
    flagged by the residual) rather than clipped away.

    Two vectorizable passes per row: the update, which leaves |change| in H (free once the layer is updated), then
    the maximum of |change| taken over the IEEE bit patterns as unsigned integers. For non-negative floats that
    order is the numeric order, and NaN sorts above everything, so the residual is NaN exactly when a change is
    (a floating-point max reduction that respects NaN does not vectorize: ~4x slower, measured)."""
    c0 = col[i]
    zero = S.dtype.type(0.0)
    one = S.dtype.type(1.0)
    a = S.dtype.type(slope)
    step = S.dtype.type(dt)
    fixed_point = dt == 1.0
    bits = _bits(H)
    if i == num_layers - 1:  # the nudge only touches the (small) last state layer
        _apply_nudge(S, H, rows, c0, n_i, nudge)
    for r in range(rows):
        # two loops rather than one over a view that is either x_proj[r] or a slice of biases: the unified view
        # type has an unknown stride and the loop would not vectorize
        s_row = S[r, c0:c0 + n_i]
        h_row = H[r, c0:c0 + n_i]
        if i == 0:
            constant = x_proj[r]
            for j in range(n_i):
                h_row[j], s_row[j] = _advance(s_row[j], h_row[j] + constant[j], a, step, fixed_point, zero, one)
        else:
            constant = biases[c0:c0 + n_i]
            for j in range(n_i):
                h_row[j], s_row[j] = _advance(s_row[j], h_row[j] + constant[j], a, step, fixed_point, zero, one)
        largest = bits[r, c0]
        for j in range(1, n_i):
            largest = max(largest, bits[r, c0 + j])
        bits[r, c0] = largest
        residual[r] = _nan_max(residual[r], H[r, c0])


# ------------------------------------------------------------------------------------------------ small batches
SMALL_BATCH = 4  # at most this many active rows: fused matrix-vector products instead of BLAS


@njit(cache=True, fastmath=True)
def _fused_rows(W, below, above, forward, backward, start, stop):
    """For output units o in [start, stop) of W (n_out, n_in), in one pass over those rows of W:
    forward[o] += W[o] . below  and  backward += W[o] * above[o]   (i.e. W below and W^T above).
    Four rows at a time, so each element of ``backward`` is loaded and stored once per four rows."""
    n_in = W.shape[1]
    zero = W.dtype.type(0.0)
    o = start
    while o + 4 <= stop:
        a0, a1, a2, a3 = above[o], above[o + 1], above[o + 2], above[o + 3]
        c0 = zero
        c1 = zero
        c2 = zero
        c3 = zero
        for j in range(n_in):
            x = below[j]
            w0, w1, w2, w3 = W[o, j], W[o + 1, j], W[o + 2, j], W[o + 3, j]
            c0 += w0 * x
            c1 += w1 * x
            c2 += w2 * x
            c3 += w3 * x
            backward[j] += w0 * a0 + w1 * a1 + w2 * a2 + w3 * a3
        forward[o] += c0
        forward[o + 1] += c1
        forward[o + 2] += c2
        forward[o + 3] += c3
        o += 4
    while o < stop:
        a0 = above[o]
        c0 = zero
        for j in range(n_in):
            c0 += W[o, j] * below[j]
            backward[j] += W[o, j] * a0
        forward[o] += c0
        o += 1


@njit(cache=True)
def _skinny_couplings(S, H, rows, weights, col):
    """Add both directions of every skinny coupling W_k (k >= 1, ``_skinny``) to H[:rows], one pass over W_k per row
    (``_fused_rows``), after ``_coupling(..., skip_skinny=True)`` wrote the other terms. Two BLAS calls with a ten-wide
    operand cost more than the products themselves: 17.2 against 12.3 us per step for a 50 x 512 layer under a
    10-unit one, measured."""
    for k in range(1, len(weights)):
        W = weights[k]
        if not _skinny(W):
            continue
        n_out, n_in = W.shape
        below, above = col[k - 1], col[k]
        for r in range(rows):
            _fused_rows(W, S[r, below:below + n_in], S[r, above:above + n_out], H[r, above:above + n_out],
                        H[r, below:below + n_in], 0, n_out)


@njit(cache=True)
def _coupling_small(S, H, rows, weights, col, forward):
    """Synchronous coupling of every layer for a few rows: H[:rows] = the fields from the other layers' states
    (no constants), reading each W_i (i >= 1) once per row. Single-threaded on purpose: at this size a parallel
    region costs more than it saves and its threads would compete with BLAS's; ``forward`` is scratch (N,)."""
    width = S.shape[1]
    n_first = weights[0].shape[0]
    for r in range(rows):
        H[r, :] = 0.0
        forward[:] = 0.0
        for i in range(1, len(weights)):
            W = weights[i]
            n_out, n_in = W.shape
            _fused_rows(W, S[r, col[i - 1]:col[i - 1] + n_in], S[r, col[i]:col[i] + n_out],
                        forward[col[i]:col[i] + n_out], H[r, col[i - 1]:col[i - 1] + n_in], 0, n_out)
        for c in range(n_first, width):
            H[r, c] += forward[c]


# ------------------------------------------------------------------------------------------------ helpers


@njit(cache=True, nogil=True)
def input_projection(blas, x, w0, b1):
    """X1 = x W_0^T + b_1: x (B, n_0), W_0 (n_1, n_0), b_1 (n_1,) -> (B, n_1), the constant part of s_1's field.
    Up to SMALL_BATCH rows: one fused pass over W_0 (a GEMM call with one row ran at ~2.4 GFLOP/s, 0.17 ms of a
    0.75 ms relaxation of a 784-512-512-10 network at batch 1, measured); more: SciPy's GEMM."""
    rows = x.shape[0]
    n_1, n_0 = w0.shape
    out = np.empty((rows, n_1), dtype=x.dtype)
    if rows <= SMALL_BATCH:
        for r in range(rows):
            _matvec_rows(w0, x[r], out[r])
    else:
        rows_times_wt(blas, rows, x.ctypes.data, n_0, n_0, w0.ctypes.data, n_1, out.ctypes.data, n_1, False)
    for r in range(rows):
        for j in range(n_1):
            out[r, j] += b1[j]
    return out


@njit(cache=True, fastmath=True, nogil=True)
def _matvec_rows(W, v, out):
    """out[o] = W[o] . v for every row o of W (n_out, n_in), four rows per pass over v."""
    n_out, n_in = W.shape
    zero = W.dtype.type(0.0)
    o = 0
    while o + 4 <= n_out:
        c0 = zero
        c1 = zero
        c2 = zero
        c3 = zero
        for j in range(n_in):
            x = v[j]
            c0 += W[o, j] * x
            c1 += W[o + 1, j] * x
            c2 += W[o + 2, j] * x
            c3 += W[o + 3, j] * x
        out[o], out[o + 1], out[o + 2], out[o + 3] = c0, c1, c2, c3
        o += 4
    while o < n_out:
        c0 = zero
        for j in range(n_in):
            c0 += W[o, j] * v[j]
        out[o] = c0
        o += 1


@njit(cache=True, nogil=True)
def weight_contrast(blas, high_above, high_below, low_above, low_below, shared_below, divisor=1.0):
    """(dE/dW(high) - dE/dW(low)) / divisor for E's term -s_above^T W s_below, batch mean:
    -(high_above^T high_below - low_above^T low_below) / (B divisor), shape (n_above, n_below); inputs (B, n)
    row-major. shared_below: the layer below is the same in both states (the clamped input), so it is one product,
    -(high_above - low_above)^T below / (B divisor). The divisor (EP's nudge scale) rides on the small (B, n) factor,
    not on the (n_above, n_below) result."""
    batch, n_above = high_above.shape
    n_below = high_below.shape[1]
    out = np.empty((n_above, n_below), dtype=high_above.dtype)
    scale = high_above.dtype.type(-1.0 / (batch * divisor))
    if shared_below:
        difference = (high_above - low_above) * scale
        rows_t_times(blas, n_above, n_below, batch, difference.ctypes.data, n_above, high_below.ctypes.data,
                     n_below, out.ctypes.data, n_below, False)
        return out
    negative = low_above * -scale
    high = high_above * scale
    rows_t_times(blas, n_above, n_below, batch, high.ctypes.data, n_above, high_below.ctypes.data, n_below,
                 out.ctypes.data, n_below, False)
    rows_t_times(blas, n_above, n_below, batch, negative.ctypes.data, n_above, low_below.ctypes.data, n_below,
                 out.ctypes.data, n_below, True)
    return out


@njit(cache=True)
def _workspace(x_proj, beta, target, readout_w, readout_b, initial):
    """What every kernel starts from: states S (a copy of ``initial``), field buffer H, a copy of the input projection
    (rows move as samples retire), the per-row target, the nudge tuple (beta, target, readout_w, readout_b), the
    row -> sample index, residuals."""
    S = initial.copy()
    y = target.copy()
    return (S, np.empty_like(S), x_proj.copy(), y, (beta, y, readout_w, readout_b),
            np.arange(x_proj.shape[0]), np.zeros(x_proj.shape[0], dtype=np.float64))


@njit(cache=True)
def _retire(r, last, step, residual, S, per_row_arrays, per_row_vectors, index, tol,
            out_states, out_steps, out_residual, out_converged, out_diverged):
    """Write active row r to the outputs and move the last active row into its place."""
    original = index[r]
    out_states[original, :] = S[r, :]
    out_steps[original] = step
    out_residual[original] = residual[r]
    finite = np.isfinite(residual[r])
    out_converged[original] = finite and residual[r] < tol
    out_diverged[original] = not finite
    if r != last:
        S[r, :] = S[last, :]
        for a in per_row_arrays:
            a[r, :] = a[last, :]
        for v in per_row_vectors:
            v[r] = v[last]
        index[r] = index[last]
        residual[r] = residual[last]


@njit(cache=True)
def _record(trajectory, step, S, rows, index):
    for r in range(rows):
        trajectory[step, index[r], :] = S[r, :]


# ------------------------------------------------------------------------------------------------ kernels


@njit(cache=True, nogil=True)
def relax_fixed_point(blas, x_proj, weights, biases, col, slope, dt, alternating, beta, target, readout_w, readout_b,
                      initial, tol, max_steps, record, trajectory, out_states, out_steps, out_residual, out_converged,
                      out_diverged):
    """Euler / fixed-point relaxation of a batch. See the module docstring.

    blas: ``ebm_sim.blas.make_handle(dtype)``; x_proj (B, n_1): ``input_projection`` of the inputs (not modified);
    weights: tuple of W_i (n_{i+1}, n_i); biases: flat (N,)
    b_1..b_L in layer order; col (L,) column offsets; target (B, n_L), or (B, classes) with a readout (unused when
    beta == 0); readout_w (classes, n_L) and readout_b (classes,): the softmax readout of the cross-entropy nudge, or
    arrays with no rows for the MSE nudge; initial (B, N). Outputs are written in place:
    out_states (B, N), out_steps/out_residual/out_converged/out_diverged (B,). When ``record`` is true,
    trajectory (max_steps + 1, B, N) receives the state after every step of every still-active sample.
    """
    batch = x_proj.shape[0]
    num_layers = len(weights)
    S, H, x_proj, y, nudge, index, residual = _workspace(x_proj, beta, target, readout_w, readout_b, initial)
    empty_vectors = [np.empty(0, dtype=np.float64)][:0]
    forward = np.empty(S.shape[1], dtype=S.dtype)
    if record:
        trajectory[0, :, :] = S
    rows = batch
    step = 0
    while rows > 0 and step < max_steps:
        step += 1
        residual[:rows] = 0.0
        if alternating:
            for parity in range(2):
                for i in range(parity, num_layers, 2):
                    _coupling(i, S, H, rows, weights, col, blas)
                    _euler_update(i, S, H, rows, num_layers, col, weights[i].shape[0], x_proj, biases, nudge,
                                  slope, dt, residual)
        else:
            if rows <= SMALL_BATCH:
                _coupling_small(S, H, rows, weights, col, forward)
            else:
                for i in range(num_layers):
                    _coupling(i, S, H, rows, weights, col, blas, True)
                _skinny_couplings(S, H, rows, weights, col)
            for i in range(num_layers):
                _euler_update(i, S, H, rows, num_layers, col, weights[i].shape[0], x_proj, biases, nudge,
                              slope, dt, residual)
        if dt != 1.0:
            residual[:rows] /= dt
        if record:
            _record(trajectory, step, S, rows, index)
        r = 0
        while r < rows:
            if residual[r] < tol or not np.isfinite(residual[r]):
                rows -= 1
                _retire(r, rows, step, residual, S, [x_proj, y], empty_vectors, index, tol,
                        out_states, out_steps, out_residual, out_converged, out_diverged)
            else:
                r += 1
    for r in range(rows - 1, -1, -1):
        _retire(r, r, step, residual, S, [x_proj, y], empty_vectors, index, tol,
                out_states, out_steps, out_residual, out_converged, out_diverged)


_DP_A, _DP_E = DORMAND_PRINCE.a, DORMAND_PRINCE.e  # ebm_sim.integrators' tableau (Numba reads globals)


@njit(cache=True)
def _projected_velocity(Y, K, rows, weights, col, blas, x_proj, biases, nudge, slope, H):
    """K = P_Y(a h(Y) - Y): the flow at Y with components pushing out of [0, 1] at a bound set to zero."""
    for i in range(len(weights)):
        _field(i, Y, H, rows, weights, col, blas, x_proj, biases, nudge)
    width = Y.shape[1]
    for r in range(rows):
        for c in range(width):
            v = slope * H[r, c] - Y[r, c]
            if (Y[r, c] <= 0.0 and v < 0.0) or (Y[r, c] >= 1.0 and v > 0.0):
                v = 0.0
            K[r, c] = v


@njit(cache=True, nogil=True)
def relax_rk45(blas, x_proj, weights, biases, col, slope, beta, target, readout_w, readout_b, initial, tol, max_steps,
               rtol, atol, dt0, dt_max,
               record, trajectory, out_states, out_steps, out_residual, out_converged, out_diverged):
    """Adaptive Dormand-Prince relaxation of a batch (arguments as ``relax_fixed_point``).

    Per sample: step size dt (starting at dt0, at most dt_max), error = RMS of (clip(y5) - clip(y4)) /
    (atol + rtol max(|s|, |y5|)); a step is accepted when error <= 1, then s <- clip(y5). Steps count attempts
    (accepted and rejected). The residual max |P(ds/dt)| is checked before every attempt.
    """
    batch, width = initial.shape
    S, H, x_proj, y, nudge, index, residual = _workspace(x_proj, beta, target, readout_w, readout_b, initial)
    K = np.empty((7, batch, width), dtype=S.dtype)
    Y = np.empty_like(S)
    step_size = np.full(batch, dt0, dtype=np.float64)
    K0 = K[0]
    _projected_velocity(S, K0, batch, weights, col, blas, x_proj, biases, nudge, slope, H)
    if record:
        trajectory[0, :, :] = S
    rows = batch
    step = 0
    while rows > 0:
        for r in range(rows):
            largest = 0.0
            for c in range(width):
                v = abs(K0[r, c])
                if v > largest or v != v:
                    largest = v
            residual[r] = largest
        r = 0
        while r < rows:
            if residual[r] < tol or not np.isfinite(residual[r]) or step >= max_steps:
                rows -= 1
                _retire(r, rows, step, residual, S, [x_proj, y, K0], [step_size], index, tol,
                        out_states, out_steps, out_residual, out_converged, out_diverged)
            else:
                r += 1
        if rows == 0:
            break
        step += 1
        for stage in range(1, 7):
            for r in range(rows):
                h = step_size[r]
                for c in range(width):
                    acc = 0.0
                    for j in range(stage):
                        acc += _DP_A[stage, j] * K[j, r, c]
                    Y[r, c] = S[r, c] + h * acc
            _projected_velocity(Y, K[stage], rows, weights, col, blas, x_proj, biases, nudge, slope, H)
        # the last stage evaluated the flow at y5 (the tableau's last row is the fifth-order weights): Y = y5,
        # K[6] = f(y5), the FSAL stage the error estimate needs
        for r in range(rows):
            h = step_size[r]
            error = 0.0
            for c in range(width):
                err = 0.0
                for j in range(7):
                    err += _DP_E[j] * K[j, r, c]
                y5 = Y[r, c]
                y4 = y5 - h * err
                y5c = min(max(y5, 0.0), 1.0)
                y4c = min(max(y4, 0.0), 1.0)
                scale = atol + rtol * max(abs(S[r, c]), abs(y5c))
                error = max(error, abs(y5c - y4c) / scale)
            if error <= 1.0:
                for c in range(width):
                    S[r, c] = min(max(Y[r, c], 0.0), 1.0)
                factor = 10.0 if error == 0.0 else min(10.0, 0.9 * error ** -0.2)
            else:
                factor = max(0.2, 0.9 * error ** -0.2) if np.isfinite(error) else 0.2
            step_size[r] = min(h * factor, dt_max)
        _projected_velocity(S, K0, rows, weights, col, blas, x_proj, biases, nudge, slope, H)
        if record:
            _record(trajectory, step, S, rows, index)
