"""Convolutions as the Lava graph carries them: average pooling folded into the kernel, and a convolution written as
the sparse matrix of a ``lava.proc.sparse.Sparse`` process (numpy and scipy only; no simulator, no Lava).

Layout: a (C, H, W) layer is flattened in C order, index (c H + y) W + x, the order of the simulator's states.

    conv (stride S, zero padding P):  u[o, i, j] = sum_{c, a, b} K[o, c, a, b] s[c, i S + a - P, j S + b - P]
    2x2 average pooling of u:          v[o, i, j] = 1/4 sum_{m, n in {0, 1}} u[o, 2 i + m, 2 j + n]
                                       = a convolution with kernel size k + S, stride 2 S, padding P and kernel
                                         K'[o, c, a', b'] = 1/4 sum_{m, n} K[o, c, a' - m S, b' - n S]   (fold_avg_pool)
    the matrix M (C_out Ho Wo, C_in H W) of a conv: u = M s; the field it sends back to its pre layer is M^T v,
    which is the simulator's conv_transpose(avg-unpool(v)) (average unpooling is the adjoint of average pooling).
"""
from __future__ import annotations

import numpy as np
from scipy.sparse import csr_matrix


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """(size + 2 padding - kernel) // stride + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def fold_avg_pool(kernel: np.ndarray, stride: int) -> np.ndarray:
    """K (C_out, C_in, k, k) of a stride-S conv followed by 2x2 average pooling -> K' (C_out, C_in, k + S, k + S) of
    the one stride-2S conv that computes both (module docstring); the pooled map's size is the folded conv's."""
    kernel = np.asarray(kernel)
    if kernel.ndim != 4 or kernel.shape[2] != kernel.shape[3]:
        raise ValueError(f"a conv kernel has shape (C_out, C_in, k, k), got {kernel.shape}")
    if not (isinstance(stride, (int, np.integer)) and stride >= 1):
        raise ValueError(f"stride must be an integer >= 1, got {stride!r}")
    k = kernel.shape[2]
    folded = np.zeros(kernel.shape[:2] + (k + stride, k + stride), dtype=np.float64)
    for m in (0, 1):
        for n in (0, 1):
            folded[:, :, m * stride:m * stride + k, n * stride:n * stride + k] += kernel / 4.0
    return folded


def conv_matrix(kernel: np.ndarray, input_shape: tuple, stride: int, padding: int) -> csr_matrix:
    """M (C_out Ho Wo, C_in H W), the conv of ``kernel`` (C_out, C_in, k, k) on a (C_in, H, W) layer with zero
    ``padding`` and ``stride``, as a CSR matrix with the kernel's dtype: M[(o Ho + i) Wo + j, (c H + y) W + x] =
    K[o, c, y - i S + P, x - j S + P]. Every kernel tap that lands inside the input is stored (zeros included: a chip
    stores them too); taps on the padding are dropped."""
    kernel = np.asarray(kernel)
    channels, height, width = (int(n) for n in input_shape)
    c_out, c_in, k, k2 = kernel.shape
    if c_in != channels or k != k2:
        raise ValueError(f"a kernel {kernel.shape} does not fit a {tuple(input_shape)} layer (C_out, C_in, k, k "
                         f"with C_in = {channels})")
    ho, wo = (conv_output_size(n, k, stride, padding) for n in (height, width))
    if ho < 1 or wo < 1:
        raise ValueError(f"a {k}x{k} kernel with stride {stride} and padding {padding} does not fit {height}x{width}")
    o, i, j, c, a, b = np.ix_(*(np.arange(n) for n in (c_out, ho, wo, c_in, k, k)))
    y, x = i * stride + a - padding, j * stride + b - padding
    shape = (c_out, ho, wo, c_in, k, k)
    inside = np.broadcast_to((y >= 0) & (y < height) & (x >= 0) & (x < width), shape)
    rows = np.broadcast_to((o * ho + i) * wo + j, shape)[inside]
    cols = np.broadcast_to((c * height + y) * width + x, shape)[inside]
    data = np.broadcast_to(kernel[:, None, None, :, :, :], shape)[inside]
    matrix = csr_matrix((data, (rows, cols)), shape=(c_out * ho * wo, channels * height * width))
    matrix.sort_indices()
    return matrix
