"""Winograd F(2x2, 3x3) for the Numba backend's 3x3, stride-1 convolutions (Lavin & Gray 2016, "Fast Algorithms
for Convolutional Neural Networks", CVPR): each 2x2 output tile of a correlation costs 16 multiplications per pair of
channels instead of 36, done as 16 GEMMs (SciPy's BLAS, :mod:`ebm_sim.blas`).

    U[p] = (G w G^T)[p]      (16, R, S)   per pair of channels, once per relaxation (``transform_weights``)
    V[p] = (B^T d B)[p]      (16, S, T)   d: the 4x4 input tile at (2 ty - P, 2 tx - P), zero outside the image;
                                          T = batch x tiles_h x tiles_w, tiles = ceil(out / 2)
    M[p] = U[p] V[p]         (16, R, T)   16 GEMMs
    y    = A^T m A           (2, 2)       per output channel and tile; a row/column past the output is dropped

    B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    G   = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
    A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]

The post field conv(s_pre) uses w = W[o, c] (R = C_out, S = C_in, padding P). The pre field's conv_transpose of a
stride-1 convolution is the correlation of the routed post state with the flipped, channel-swapped kernel
w = W[o, c, 2 - i, 2 - j] (R = C_in, S = C_out) and padding 2 - P. Results equal im2col's up to rounding (the
tests hold them to float64 rounding); where two conv outputs of a max-pool window tie exactly, rounding may pick the
other one.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..blas import rows_times_w, single_threaded

# Where Winograd runs: measured on this 2-core machine (quiet, 2 threads, ms per fixed_point step), the Laborieux
# CIFAR-10 network at batch 128 took 409-495 with Winograd on every layer from 16 channels and 16 tiles vs 611-824
# by im2col, but at batch 1 (at most 64 tiles per convolution) 15-22 vs 6.7-6.9, and the 16-32-64 cifar10-cpu
# network at batch 128 37-41 vs 30-32: the 16 small GEMMs and the transforms' threads cost more than they save.
MIN_CHANNELS = 128  # the GEMMs' inner dimension (input channels) below which im2col is faster
MIN_TILES = 256     # 2x2 output tiles over the batch below which im2col is faster


def tiles(out_h: int, out_w: int) -> tuple:
    return (out_h + 1) // 2, (out_w + 1) // 2


def worthwhile(kernel: int, stride: int, padding: int, channels_in: int, batch: int, out_h: int, out_w: int) -> bool:
    """Whether a correlation of this geometry runs by Winograd: 3x3, stride 1, padding at most 2 (the transpose's
    padding 2 - P stays >= 0), enough input channels and output tiles over the batch."""
    tiles_h, tiles_w = tiles(out_h, out_w)
    return (kernel == 3 and stride == 1 and padding <= 2 and channels_in >= MIN_CHANNELS
            and batch * tiles_h * tiles_w >= MIN_TILES)


@njit(cache=True)
def transform_weights(weight, flip, out):
    """out (16, R, S) = G w G^T for every pair of channels of weight (C_out, C_in, 3, 3): flip False: (R, S) =
    (C_out, C_in), w = W[o, c]; flip True: (R, S) = (C_in, C_out), w[i, j] = W[o, c, 2 - i, 2 - j]."""
    c_out, c_in = weight.shape[0], weight.shape[1]
    gg = np.empty((4, 3), dtype=np.float64)
    for o in range(c_out):
        for c in range(c_in):
            for j in range(3):
                if flip:
                    g0, g1, g2 = weight[o, c, 2, 2 - j], weight[o, c, 1, 2 - j], weight[o, c, 0, 2 - j]
                else:
                    g0, g1, g2 = weight[o, c, 0, j], weight[o, c, 1, j], weight[o, c, 2, j]
                gg[0, j] = g0
                gg[1, j] = 0.5 * (g0 + g1 + g2)
                gg[2, j] = 0.5 * (g0 - g1 + g2)
                gg[3, j] = g2
            r, s = (c, o) if flip else (o, c)
            for i in range(4):
                a0, a1, a2 = gg[i, 0], gg[i, 1], gg[i, 2]
                out[4 * i, r, s] = a0
                out[4 * i + 1, r, s] = 0.5 * (a0 + a1 + a2)
                out[4 * i + 2, r, s] = 0.5 * (a0 - a1 + a2)
                out[4 * i + 3, r, s] = a2


@njit(cache=True, parallel=True, nogil=True)
def transform_input(x, padding, tiles_h, tiles_w, v):
    """v (16, C, T) = B^T d B of every 4x4 tile d of x (B, C, H, W) (any strides) at (2 ty - P, 2 tx - P), zero
    outside the image. Per row of tiles: the 4 input rows it covers, zero-padded, are combined by B^T once, then
    each tile's columns by B."""
    batch, channels, height, width = x.shape
    span = 2 * tiles_w + 2
    for c in prange(channels):
        rows = np.empty((4, span), dtype=v.dtype)
        for b in range(batch):
            for ty in range(tiles_h):
                for i in range(4):
                    y = 2 * ty - padding + i
                    if 0 <= y < height:
                        for j in range(span):
                            xx = j - padding
                            rows[i, j] = x[b, c, y, xx] if 0 <= xx < width else 0.0
                    else:
                        rows[i, :] = 0.0
                for j in range(span):  # B^T along the rows
                    d0, d1, d2, d3 = rows[0, j], rows[1, j], rows[2, j], rows[3, j]
                    rows[0, j] = d0 - d2
                    rows[1, j] = d1 + d2
                    rows[2, j] = d2 - d1
                    rows[3, j] = d1 - d3
                t0 = (b * tiles_h + ty) * tiles_w
                for i in range(4):  # B along the columns of each tile
                    for tx in range(tiles_w):
                        j = 2 * tx
                        a0, a1, a2, a3 = rows[i, j], rows[i, j + 1], rows[i, j + 2], rows[i, j + 3]
                        v[4 * i, c, t0 + tx] = a0 - a2
                        v[4 * i + 1, c, t0 + tx] = a1 + a2
                        v[4 * i + 2, c, t0 + tx] = a2 - a1
                        v[4 * i + 3, c, t0 + tx] = a1 - a3


@njit(cache=True, parallel=True, nogil=True)
def transform_output(m, tiles_h, tiles_w, y):
    """y (B, R, Ho, Wo) (any strides) = A^T m A of every tile of m (16, R, T); a row or column past Ho, Wo (odd
    sizes) is dropped."""
    batch, channels, out_h, out_w = y.shape
    for r in prange(channels):
        for b in range(batch):
            for ty in range(tiles_h):
                t0 = (b * tiles_h + ty) * tiles_w
                row = 2 * ty
                for tx in range(tiles_w):
                    t = t0 + tx
                    u0 = m[0, r, t] + m[4, r, t] + m[8, r, t]
                    u1 = m[1, r, t] + m[5, r, t] + m[9, r, t]
                    u2 = m[2, r, t] + m[6, r, t] + m[10, r, t]
                    u3 = m[3, r, t] + m[7, r, t] + m[11, r, t]
                    w0 = m[4, r, t] - m[8, r, t] - m[12, r, t]
                    w1 = m[5, r, t] - m[9, r, t] - m[13, r, t]
                    w2 = m[6, r, t] - m[10, r, t] - m[14, r, t]
                    w3 = m[7, r, t] - m[11, r, t] - m[15, r, t]
                    col = 2 * tx
                    y[b, r, row, col] = u0 + u1 + u2
                    if col + 1 < out_w:
                        y[b, r, row, col + 1] = u1 - u2 - u3
                    if row + 1 < out_h:
                        y[b, r, row + 1, col] = w0 + w1 + w2
                        if col + 1 < out_w:
                            y[b, r, row + 1, col + 1] = w1 - w2 - w3


@njit(cache=True, parallel=True, nogil=True)
def _products(routine, transformed, v, m):
    """m[p] = transformed[p] v[p] for the 16 positions, spread over Numba's threads (BLAS single-threaded)."""
    rows, inner, count = transformed.shape[1], transformed.shape[2], v.shape[2]
    for p in prange(16):
        blas = (routine, np.empty(2, dtype=m.dtype))  # alpha/beta scratch of this product's own
        rows_times_w(blas, rows, transformed[p].ctypes.data, inner, inner, v[p].ctypes.data, count,
                     m[p].ctypes.data, count, False)


def correlate(blas, x, transformed, padding, v, m, y):
    """y (B, R, Ho, Wo) = the 3x3 correlation of x (B, S, H, W) with padding P, from the transformed weights
    (16, R, S); v (16, S, T) and m (16, R, T) are scratch (T = B tiles_h tiles_w). The transforms run over
    channels and the 16 GEMMs over positions on Numba's threads, each GEMM single-threaded (SciPy's OpenBLAS on two
    threads ran these (256, 128) x (128, 2048) products 5x slower than on one)."""
    tiles_h, tiles_w = (y.shape[2] + 1) // 2, (y.shape[3] + 1) // 2
    transform_input(x, padding, tiles_h, tiles_w, v)
    with single_threaded:
        _products(blas[0], transformed, v, m)
    transform_output(m, tiles_h, tiles_w, y)
