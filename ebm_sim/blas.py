"""Row-major matrix products for Numba kernels, calling BLAS ``?gemm`` directly with no allocation.

Numba's ``np.dot`` allocates its result on every call; these wrappers write into (or accumulate onto) a
caller's buffer, which is what a relaxation loop needs. They call the BLAS that SciPy ships
(``scipy.linalg.cython_blas``). The routine's address is a run-time argument (``gemm_address(dtype)``), not a
global baked into the compiled code, so the kernels can be cached on disk. Every Fortran argument is passed by
address; addresses are machine-word integers, as pointers are in the x86-64 and AArch64 calling conventions.

Row-major C (m, n) = A (m, k) @ B (k, n) is column-major C^T = B^T A^T, so each wrapper swaps the operands.
"""
from __future__ import annotations

import threading

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import get_cython_function_address, intrinsic

_ADDRESSES = {np.dtype(np.float32): get_cython_function_address("scipy.linalg.cython_blas", "sgemm"),
              np.dtype(np.float64): get_cython_function_address("scipy.linalg.cython_blas", "dgemm")}
_NO_TRANSPOSE = ord("N")
_TRANSPOSE = ord("T")


def make_handle(dtype) -> tuple:
    """(address of SciPy's sgemm or dgemm, scratch for alpha and beta in that precision): the ``blas`` argument
    of the wrappers below and of the kernels that use them."""
    dtype = np.dtype(dtype)
    return _ADDRESSES[dtype], np.empty(2, dtype=dtype)


@intrinsic
def _call_by_address(typingctx, address, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13):
    """Call the void function at ``address`` with 13 machine-word arguments (Fortran pointers)."""
    signature = types.void(types.intp, *([types.intp] * 13))

    def codegen(context, builder, sig, args):
        word = ir.IntType(64)
        function_type = ir.FunctionType(ir.VoidType(), [word] * 13)
        function = builder.inttoptr(args[0], function_type.as_pointer())
        builder.call(function, args[1:])
        return context.get_dummy_value()

    return signature, codegen


@njit(cache=True)
def _gemm_col_major(routine, trans_a, trans_b, m, n, k, a_ptr, lda, b_ptr, ldb, beta, c_ptr, ldc, scalars):
    """Column-major C = op(A) op(B) + beta C through the BLAS routine at address ``routine``; ``scalars`` (the
    routine's precision, length >= 2) holds alpha and beta in memory."""
    ints = np.empty(8, dtype=np.int32)
    ints[0] = trans_a
    ints[1] = trans_b
    ints[2] = m
    ints[3] = n
    ints[4] = k
    ints[5] = lda
    ints[6] = ldb
    ints[7] = ldc
    scalars[0] = 1.0
    scalars[1] = beta
    ip = ints.ctypes.data
    fp = scalars.ctypes.data
    _call_by_address(routine, ip, ip + 4, ip + 8, ip + 12, ip + 16, fp, a_ptr, ip + 20, b_ptr, ip + 24,
                     fp + scalars.itemsize, c_ptr, ip + 28)
    return ints[0]  # keeps `ints` alive until after the call


@njit(cache=True)
def rows_times_wt(blas, rows, a_ptr, lda, k, w_ptr, n, c_ptr, ldc, accumulate):
    """Row-major C (rows, n) [+]= A (rows, k) @ W^T for a contiguous row-major W of shape (n, k).

    A and C may be column blocks of wider row-major buffers: lda and ldc are their row strides (elements).
    ``blas`` is the handle made by ``make_handle``.
    """
    routine, scalars = blas
    _gemm_col_major(routine, _TRANSPOSE, _NO_TRANSPOSE, n, rows, k, w_ptr, k, a_ptr, lda,
                    1.0 if accumulate else 0.0, c_ptr, ldc, scalars)


@njit(cache=True)
def rows_times_w(blas, rows, a_ptr, lda, k, w_ptr, n, c_ptr, ldc, accumulate):
    """Row-major C (rows, n) [+]= A (rows, k) @ W for a contiguous row-major W of shape (k, n)."""
    routine, scalars = blas
    _gemm_col_major(routine, _NO_TRANSPOSE, _NO_TRANSPOSE, n, rows, k, w_ptr, n, a_ptr, lda,
                    1.0 if accumulate else 0.0, c_ptr, ldc, scalars)


@njit(cache=True)
def rows_t_times(blas, m, n, k, a_ptr, lda, b_ptr, ldb, c_ptr, ldc, accumulate):
    """Row-major C (m, n) [+]= A^T @ B for row-major A (k, m) and B (k, n) with row strides lda and ldb (elements):
    column-major C^T = B^T A, i.e. ``gemm("N", "T")`` on the swapped operands."""
    routine, scalars = blas
    _gemm_col_major(routine, _NO_TRANSPOSE, _TRANSPOSE, n, m, k, b_ptr, ldb, a_ptr, lda,
                    1.0 if accumulate else 0.0, c_ptr, ldc, scalars)


class _SingleThreadedScope:
    """Context manager: SciPy's OpenBLAS runs single-threaded inside it (re-entrant across threads; the previous
    thread count comes back when the last scope exits). The kernels parallelise over samples themselves: each
    worker thread relaxes its own rows and calls BLAS in its own thread, with no synchronisation between them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = None
        self._controller = None

    def _blas(self):
        if self._controller is None:
            from threadpoolctl import ThreadpoolController
            found = [lib for lib in ThreadpoolController().lib_controllers
                     if lib.internal_api == "openblas" and "scipy" in lib.filepath]
            self._controller = found[0] if found else False  # False: not OpenBLAS, leave threads alone
        return self._controller

    def __enter__(self):
        with self._lock:
            blas = self._blas()
            if blas and self._depth == 0:
                self._saved = blas.get_num_threads()
                blas.set_num_threads(1)
            self._depth += 1

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            blas = self._blas()
            if blas and self._depth == 0 and self._saved is not None:
                blas.set_num_threads(self._saved)


single_threaded = _SingleThreadedScope()
