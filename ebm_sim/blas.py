"""Row-major matrix products for Numba kernels, calling BLAS ``?gemm`` directly with no allocation.

Numba's ``np.dot`` allocates its result on every call; these wrappers write into (or accumulate onto) a
caller's buffer, which is what a relaxation loop needs. They call the BLAS that SciPy ships
(``scipy.linalg.cython_blas``), through function pointers: every Fortran argument is passed by address, and
addresses are passed as machine-word integers (identical to pointers in the x86-64 and AArch64 ABIs).

Row-major C (m, n) = A (m, k) @ B (k, n) is column-major C^T = B^T A^T, so each wrapper swaps the operands.
"""
from __future__ import annotations

import ctypes

import numpy as np
from numba import njit, types
from numba.extending import get_cython_function_address, overload

_WORD = ctypes.c_ssize_t
_GEMM_PROTOTYPE = ctypes.CFUNCTYPE(None, *([_WORD] * 13))
_SGEMM = _GEMM_PROTOTYPE(get_cython_function_address("scipy.linalg.cython_blas", "sgemm"))
_DGEMM = _GEMM_PROTOTYPE(get_cython_function_address("scipy.linalg.cython_blas", "dgemm"))

_NO_TRANSPOSE = ord("N")
_TRANSPOSE = ord("T")


def _gemm_col_major(trans_a, trans_b, m, n, k, alpha, a_ptr, lda, b_ptr, ldb, beta, c_ptr, ldc, scalars):
    """Column-major C = alpha op(A) op(B) + beta C. ``scalars`` (float32 or float64, length >= 2) picks the
    precision and holds alpha and beta in memory; integer arguments live in a private int32 buffer."""
    raise NotImplementedError("only callable from Numba-compiled code")


@overload(_gemm_col_major)
def _gemm_col_major_impl(trans_a, trans_b, m, n, k, alpha, a_ptr, lda, b_ptr, ldb, beta, c_ptr, ldc, scalars):
    if not isinstance(scalars, types.Array):
        return None
    routine = _SGEMM if scalars.dtype == types.float32 else _DGEMM
    itemsize = 4 if scalars.dtype == types.float32 else 8

    def impl(trans_a, trans_b, m, n, k, alpha, a_ptr, lda, b_ptr, ldb, beta, c_ptr, ldc, scalars):
        ints = np.empty(8, dtype=np.int32)
        ints[0] = trans_a
        ints[1] = trans_b
        ints[2] = m
        ints[3] = n
        ints[4] = k
        ints[5] = lda
        ints[6] = ldb
        ints[7] = ldc
        scalars[0] = alpha
        scalars[1] = beta
        ip = ints.ctypes.data
        fp = scalars.ctypes.data
        routine(ip, ip + 4, ip + 8, ip + 12, ip + 16, fp, a_ptr, ip + 20, b_ptr, ip + 24, fp + itemsize,
                c_ptr, ip + 28)
        return ints[0]  # keeps `ints` alive until after the call

    return impl


@njit(cache=True)
def rows_times_wt(rows, a_ptr, lda, k, w_ptr, n, c_ptr, ldc, accumulate, scalars):
    """Row-major C (rows, n) [+]= A (rows, k) @ W^T for a contiguous row-major W of shape (n, k).

    A and C may be column blocks of wider row-major buffers: lda and ldc are their row strides (elements).
    """
    _gemm_col_major(_TRANSPOSE, _NO_TRANSPOSE, n, rows, k, 1.0, w_ptr, k, a_ptr, lda,
                    1.0 if accumulate else 0.0, c_ptr, ldc, scalars)


@njit(cache=True)
def rows_times_w(rows, a_ptr, lda, k, w_ptr, n, c_ptr, ldc, accumulate, scalars):
    """Row-major C (rows, n) [+]= A (rows, k) @ W for a contiguous row-major W of shape (k, n)."""
    _gemm_col_major(_NO_TRANSPOSE, _NO_TRANSPOSE, n, rows, k, 1.0, w_ptr, n, a_ptr, lda,
                    1.0 if accumulate else 0.0, c_ptr, ldc, scalars)
