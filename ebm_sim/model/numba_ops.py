"""The Numba implementation of every interaction and cost (CPU, float32 and float64, numpy arrays in and out).

A convolution is im2col plus one BLAS GEMM over the whole batch, in the layout where im2col and col2im copy along
image rows (Caffe's) and no transpose is ever materialised (equations: :mod:`ebm_sim.model.conv`; the numpy
reference is :mod:`ebm_sim.model.numpy_ops`):

    cols (C_in k k, B Ho Wo)      cols[(c, i, j), (b, ho, wo)] = s_pre padded[b, c, S ho + i, S wo + j]      (im2col)
    u    (C_out, B, Ho, Wo)       u = W cols, W seen as (C_out, C_in k k)                         (one GEMM: conv)
    post (B, C_out, H', W')       pool(u), and in the same pass the first maximum of each 2x2 window (max pooling)
    g    (C_out, B, Ho, Wo)       unpool(s_post): routed to that maximum, spread as value / 4, or unchanged
    pre  (B, C_in, H, W)          col2im(W^T g)                                          (one GEMM: conv transpose)
    dPhi/dW = g cols^T / B        (C_out, C_in k k)                                      (one GEMM: weight gradient)

The GEMMs are SciPy's BLAS called from Numba (:mod:`ebm_sim.blas`), writing into a per-thread workspace of the
call's geometry (cols, u -- reused for g --, a pooled scratch and the argmax indices) that is allocated once, sized
for the largest batch seen (a relaxation whose stopped samples leave the batch reuses it), and kept for the
``WORKSPACES`` most recent geometries; each call allocates only the arrays it returns. A 3x3 stride-1 convolution
with enough channels and tiles runs by Winograd F(2x2, 3x3) instead (:mod:`ebm_sim.model.winograd`), from weights
transformed once per relaxation (``Conv2dNumba.prepare``). Dense layers, biases
and the costs are numpy's (already one BLAS product each) registered under this backend.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
from numba import njit

from ..blas import make_handle, rows_t_times, rows_times_w, rows_times_wt
from . import numpy_ops, winograd
from .interaction import implements

NO_POOL, MAX_POOL, AVG_POOL = 0, 1, 2
POOL_MODES = {None: NO_POOL, "max": MAX_POOL, "avg": AVG_POOL}
WORKSPACES = 8  # geometries (shapes, dtype) whose scratch each thread keeps, sized for the largest batch seen


# ---------------------------------------------------------------- kernels
@njit(cache=True, inline="always")
def _span(offset, stride, size, count):
    """[lo, hi): the t in [0, count) with 0 <= stride t + offset < size."""
    lo = 0 if offset >= 0 else (stride - 1 - offset) // stride
    hi = min(count, (size - 1 - offset) // stride + 1) if size - 1 - offset >= 0 else 0
    return lo, max(lo, hi)


@njit(cache=True)
def _unfold(image, cols, kernel, stride, padding, fold):
    """im2col (fold False): cols[(c, i, j), (b, ho, wo)] = image[b, c, S ho + i - P, S wo + j - P], 0 outside the
    image; col2im, its adjoint (fold True): image[b, c, S ho + i - P, S wo + j - P] += cols[...] for those inside.
    image (B, C, H, W), cols (C k k, B Ho Wo), Ho = (H + 2P - k) // S + 1 (likewise Wo). Each inner loop runs along
    a row of both (contiguous for stride 1)."""
    batch, channels, height, width = image.shape
    out_h = (height + 2 * padding - kernel) // stride + 1
    out_w = (width + 2 * padding - kernel) // stride + 1
    for c in range(channels):
        for i in range(kernel):
            for j in range(kernel):
                q = (c * kernel + i) * kernel + j
                lo, hi = _span(j - padding, stride, width, out_w)
                for b in range(batch):
                    for ho in range(out_h):
                        y = stride * ho + i - padding
                        start = (b * out_h + ho) * out_w
                        row = cols[q, start:start + out_w]
                        inside = 0 <= y < height
                        if fold:
                            if inside:
                                for wo in range(lo, hi):
                                    image[b, c, y, stride * wo + j - padding] += row[wo]
                        elif inside:
                            row[:lo] = 0.0
                            row[hi:] = 0.0
                            for wo in range(lo, hi):
                                row[wo] = image[b, c, y, stride * wo + j - padding]
                        else:
                            row[:] = 0.0


@njit(cache=True, inline="always")
def _window(y, x, q):
    """Row and column of entry q (0..3, row-major) of the 2x2 window of pooled pixel (y, x)."""
    return 2 * y + q // 2, 2 * x + q % 2


@njit(cache=True)
def _pool(u, mode, post, argmax):
    """post[b, o, y, x] from u (C_out, B, Ho, Wo): u[o, b, y, x] (NO_POOL), the max of the 2x2 window at (2y, 2x)
    with argmax[b, o, y, x] = its first maximum in row-major order (MAX_POOL; NaN wins, as numpy's argmax), or the
    window's mean (AVG_POOL). post (B, C_out, H', W') sets the extent: an odd trailing row/column is dropped."""
    batch, channels, height, width = post.shape
    for b in range(batch):
        for o in range(channels):
            for y in range(height):
                for x in range(width):
                    if mode == NO_POOL:
                        post[b, o, y, x] = u[o, b, y, x]
                    elif mode == AVG_POOL:
                        post[b, o, y, x] = (u[o, b, 2 * y, 2 * x] + u[o, b, 2 * y, 2 * x + 1]
                                            + u[o, b, 2 * y + 1, 2 * x] + u[o, b, 2 * y + 1, 2 * x + 1]) / 4
                    else:
                        best, first = u[o, b, 2 * y, 2 * x], 0
                        for q in range(1, 4):
                            row, col = _window(y, x, q)
                            value = u[o, b, row, col]
                            if value > best or (np.isnan(value) and not np.isnan(best)):
                                best, first = value, q
                        post[b, o, y, x] = best
                        argmax[b, o, y, x] = first


@njit(cache=True)
def _unpool(s_post, mode, argmax, g):
    """g (C_out, B, Ho, Wo) = s_post (B, C_out, H', W') routed back to the conv map: unchanged (NO_POOL), to each
    window's ``argmax`` (MAX_POOL), spread as value / 4 (AVG_POOL); zero elsewhere and on a dropped row/column."""
    if mode != NO_POOL:
        g[:] = 0.0
    batch, channels, height, width = s_post.shape
    for b in range(batch):
        for o in range(channels):
            for y in range(height):
                for x in range(width):
                    value = s_post[b, o, y, x]
                    if mode == NO_POOL:
                        g[o, b, y, x] = value
                    elif mode == MAX_POOL:
                        row, col = _window(y, x, argmax[b, o, y, x])
                        g[o, b, row, col] = value
                    else:
                        for q in range(4):
                            row, col = _window(y, x, q)
                            g[o, b, row, col] = value / 4


@njit(cache=True)
def _conv_pool(blas, cols, weight, u, mode, post, argmax):
    """u = W cols (one GEMM: (C_out, C k k) x (C k k, B Ho Wo)), then post, argmax = pool(u)."""
    fan_in, rows = cols.shape
    channels = weight.shape[0]
    rows_times_w(blas, channels, weight.ctypes.data, fan_in, fan_in, cols.ctypes.data, rows, u.ctypes.data, rows,
                 False)
    _pool(u, mode, post, argmax)


@njit(cache=True)
def _conv_transpose(blas, g, weight, cols, kernel, stride, padding, image):
    """image (B, C, H, W) += col2im(W^T g): the gradient columns (C k k, B Ho Wo) by one GEMM into ``cols``."""
    fan_in, rows = cols.shape
    channels = weight.shape[0]
    rows_t_times(blas, fan_in, rows, channels, weight.ctypes.data, fan_in, g.ctypes.data, rows, cols.ctypes.data,
                 rows, False)
    _unfold(image, cols, kernel, stride, padding, True)


@njit(cache=True)
def _weight_gradient(blas, g, cols, out):
    """out (C_out, C k k) = g cols^T, g seen as (C_out, B Ho Wo): one GEMM."""
    fan_in, rows = cols.shape
    rows_times_wt(blas, out.shape[0], g.ctypes.data, rows, rows, cols.ctypes.data, fan_in, out.ctypes.data, fan_in,
                  False)


# ---------------------------------------------------------------- workspaces
class Workspace:
    """Scratch of one geometry for up to ``capacity`` samples, as flat buffers of which ``views(batch)`` gives the
    first ``batch`` samples' part: cols (C_in k k, B Ho Wo), u (C_out, B, Ho, Wo) (conv(s_pre), then the routed
    s_post), pooled (B, C_out, H', W') (a post field nobody asked for), argmax (its window indices); plus the BLAS
    handle and, made on first use, the Winograd scratch. A relaxation whose batch shrinks as samples stop reuses it."""

    def __init__(self, capacity, conv_shape, post_shape, fan_in, dtype):
        self.capacity, self.fan_in, self.dtype = capacity, fan_in, dtype
        self.conv_shape, self.post_shape = tuple(conv_shape), tuple(post_shape)
        pixels, outputs = int(np.prod(conv_shape)), int(np.prod(post_shape))
        self._cols = np.empty(fan_in * capacity * pixels, dtype=dtype)
        self._u = np.empty(post_shape[0] * capacity * pixels, dtype=dtype)
        self._pooled = np.empty(capacity * outputs, dtype=dtype)
        self._argmax = np.zeros(capacity * outputs, dtype=np.uint8)
        self.blas = make_handle(dtype)
        self._winograd = {}  # "post" / "pre": flat (V, M) scratch of that direction

    def views(self, batch) -> tuple:
        """(cols, u, pooled, argmax) for ``batch`` <= capacity samples, contiguous."""
        pixels = int(np.prod(self.conv_shape))
        return (self._cols[:self.fan_in * batch * pixels].reshape(self.fan_in, batch * pixels),
                self._u[:self.post_shape[0] * batch * pixels].reshape((self.post_shape[0], batch) + self.conv_shape),
                self._pooled[:batch * int(np.prod(self.post_shape))].reshape((batch,) + self.post_shape),
                self._argmax[:batch * int(np.prod(self.post_shape))].reshape((batch,) + self.post_shape))

    def winograd_scratch(self, direction, channels_in, channels_out, tiles_per_sample, batch) -> tuple:
        """(V (16, channels_in, T), M (16, channels_out, T)) with T = batch x tiles_per_sample."""
        if direction not in self._winograd:
            count = self.capacity * tiles_per_sample
            self._winograd[direction] = (np.empty(16 * channels_in * count, dtype=self.dtype),
                                         np.empty(16 * channels_out * count, dtype=self.dtype))
        v, m = self._winograd[direction]
        count = batch * tiles_per_sample
        return (v[:16 * channels_in * count].reshape(16, channels_in, count),
                m[:16 * channels_out * count].reshape(16, channels_out, count))


_LOCAL = threading.local()


def workspace(key, batch, make) -> Workspace:
    """This thread's workspace for ``key`` holding at least ``batch`` samples (made by ``make()`` on first use or when
    a larger batch comes; the least recently used beyond WORKSPACES is dropped)."""
    cache = getattr(_LOCAL, "workspaces", None)
    if cache is None:
        cache = _LOCAL.workspaces = OrderedDict()
    if key in cache and cache[key].capacity >= batch:
        cache.move_to_end(key)
    else:
        cache.pop(key, None)
        cache[key] = make()
        if len(cache) > WORKSPACES:
            cache.popitem(last=False)
    return cache[key]


def float_dtype(*arrays) -> np.dtype:
    """numpy's promotion of the operands, float64 unless that is float32."""
    dtype = np.result_type(*arrays)
    return dtype if dtype == np.float32 else np.dtype(np.float64)


class ConvCall:
    """One convolution's operands, contiguous in one float dtype: s_pre (B, C_in, H, W), the weight as
    (C_out, C_in k k), the geometry and the workspace; the steps below fill the workspace and remember what it holds
    (cols: im2col of s_pre until ``transpose`` reuses it; argmax: the routing of s_pre once ``convolve`` ran)."""

    def __init__(self, i, params, s_pre):
        self.i = i
        self.shape = params["weight"].shape
        self.dtype = float_dtype(params["weight"], s_pre)
        self.weight = np.ascontiguousarray(params["weight"], self.dtype).reshape(self.shape[0], -1)
        self.s_pre = np.ascontiguousarray(s_pre, self.dtype)
        self.mode = POOL_MODES[i.pool]
        if self.s_pre.ndim != 4 or self.s_pre.shape[1] != self.shape[1]:  # the kernels do not check bounds
            raise ValueError(f"{i.describe()}: s_pre of shape {self.s_pre.shape} does not fit a weight of shape "
                             f"{self.shape}")
        pre_shape = self.s_pre.shape[1:]
        conv_shape = i.conv_shape(pre_shape)
        self.post_shape = i.output_shape(pre_shape, self.shape[0])
        key = (self.dtype.str, self.s_pre.shape[1:], self.shape, i.stride, i.padding, i.pool)
        batch = len(self.s_pre)
        self.ws = workspace(key, batch, lambda: Workspace(batch, conv_shape, self.post_shape, self.weight.shape[1],
                                                          self.dtype))
        self.cols, self.u, self.pooled, self.argmax = self.ws.views(batch)
        self.conv_shape = conv_shape
        # Winograd-transformed weights prepared for this relaxation (``prepare``), when of the call's dtype
        self.winograd = {d: params[f"winograd_{d}"] for d in ("post", "pre")
                         if f"winograd_{d}" in params and params[f"winograd_{d}"].dtype == self.dtype}
        self.unfolded = self.convolved = False

    def unfold(self):
        """im2col of s_pre into the workspace's cols (once)."""
        if not self.unfolded:
            _unfold(self.s_pre, self.cols, self.i.kernel, self.i.stride, self.i.padding, False)
            self.unfolded = True
        return self

    def convolve(self, post=None):
        """pool(conv(s_pre)) (a new array unless ``post`` is given) and, in the same pass, the max-pool routing."""
        post = np.empty((len(self.s_pre),) + self.post_shape, dtype=self.dtype) if post is None else post
        if "post" in self.winograd:
            transformed = self.winograd["post"]
            v, m = self.ws.winograd_scratch("post", transformed.shape[2], transformed.shape[1],
                                            int(np.prod(winograd.tiles(*self.conv_shape))), len(self.s_pre))
            winograd.correlate(self.ws.blas, self.s_pre, transformed, self.i.padding, v, m,
                               self.u.transpose(1, 0, 2, 3))
            _pool(self.u, self.mode, post, self.argmax)
        else:
            self.unfold()
            _conv_pool(self.ws.blas, self.cols, self.weight, self.u, self.mode, post, self.argmax)
        self.convolved = True
        return post

    def route(self, s_post, routing=None):
        """unpool(s_post) into the workspace (max pooling: to the maxima of conv(s_pre), given as ``routing``, the
        window indices ``convolve`` found, or found here by convolving into scratch)."""
        if tuple(s_post.shape) != self.pooled.shape:
            raise ValueError(f"{self.i.describe()}: s_post has shape {tuple(s_post.shape)}, not {self.pooled.shape}")
        if self.mode == MAX_POOL and routing is not None:
            self.argmax[...] = routing
        elif self.mode == MAX_POOL and not self.convolved:
            self.convolve(self.pooled)
        _unpool(np.ascontiguousarray(s_post, self.dtype), self.mode, self.argmax, self.u)
        return self

    def transpose(self):
        """conv_transpose of the routed s_post: a new (B, C_in, H, W) array (cols is overwritten)."""
        if "pre" in self.winograd:  # stride 1: correlate with the flipped, channel-swapped kernel, padding k - 1 - P
            transformed = self.winograd["pre"]
            image = np.empty(self.s_pre.shape, dtype=self.dtype)
            v, m = self.ws.winograd_scratch("pre", transformed.shape[2], transformed.shape[1],
                                            int(np.prod(winograd.tiles(*self.s_pre.shape[2:]))), len(self.s_pre))
            winograd.correlate(self.ws.blas, self.u.transpose(1, 0, 2, 3), transformed,
                               self.i.kernel - 1 - self.i.padding, v, m, image)
            return image
        image = np.zeros(self.s_pre.shape, dtype=self.dtype)
        _conv_transpose(self.ws.blas, self.u, self.weight, self.cols, self.i.kernel, self.i.stride,
                        self.i.padding, image)
        self.unfolded = False
        return image

    def weight_gradient(self):
        """Batch mean of the routed s_post correlated with s_pre: a new (C_out, C_in, k, k) array."""
        self.unfold()
        out = np.empty(self.weight.shape, dtype=self.dtype)
        _weight_gradient(self.ws.blas, self.u, self.cols, out)
        out /= len(self.s_pre)
        return out.reshape(self.shape)


@implements("conv2d", "numba")
class Conv2dNumba:
    @staticmethod
    def prepare(i, params, batch, pre_shape):
        """``params`` plus the Winograd-transformed weights (``winograd_post``: for conv(s_pre); ``winograd_pre``: for
        the pre field, when the pre layer relaxes) of the directions where :func:`winograd.worthwhile` says so, for
        a relaxation of ``batch`` samples during which the weights do not change."""
        weight = params["weight"]
        c_out, c_in = weight.shape[:2]
        out_h, out_w = i.conv_shape(pre_shape)
        extra = {}
        if winograd.worthwhile(i.kernel, i.stride, i.padding, c_in, batch, out_h, out_w):
            extra["winograd_post"] = np.empty((16, c_out, c_in), dtype=weight.dtype)
            winograd.transform_weights(weight, False, extra["winograd_post"])
        if i.pre >= 1 and winograd.worthwhile(i.kernel, i.stride, i.padding, c_out, batch, *pre_shape[1:]):
            extra["winograd_pre"] = np.empty((16, c_in, c_out), dtype=weight.dtype)
            winograd.transform_weights(weight, True, extra["winograd_pre"])
        return {**params, **extra} if extra else params

    @staticmethod
    def post_field(i, params, s_pre):
        return ConvCall(i, params, s_pre).convolve()

    @staticmethod
    def forward(i, params, s_pre):
        """(post field, routing) from one convolution of s_pre: the routing is a copy of its max-pool window indices
        (the workspace is shared), None for other pooling."""
        call = ConvCall(i, params, s_pre)
        post = call.convolve()
        return post, (call.argmax.copy() if call.mode == MAX_POOL else None)

    @staticmethod
    def pre_field(i, params, s_pre, s_post, routing=None):
        return ConvCall(i, params, s_pre).route(s_post, routing).transpose()

    @staticmethod
    def parameter_gradient(i, params, s_pre, s_post):
        return {"weight": ConvCall(i, params, s_pre).route(s_post).weight_gradient()}


# ---------------------------------------------------------------- numpy's, registered here
@implements("dense", "numba")
class DenseNumba(numpy_ops.DenseNumpy):
    """s_pre W^T and s_post W: one BLAS product each already."""


@implements("bias", "numba")
class BiasNumba(numpy_ops.BiasNumpy):
    pass


@implements("squared_error", "numba")
class SquaredErrorNumba(numpy_ops.SquaredErrorNumpy):
    pass


@implements("softmax_readout", "numba")
class SoftmaxReadoutNumba(numpy_ops.SoftmaxReadoutNumpy):
    pass


ARRAYS = numpy_ops.ARRAYS
