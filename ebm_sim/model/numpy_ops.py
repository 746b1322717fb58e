"""The numpy reference of every interaction and cost: slow and obvious on purpose (im2col by
``sliding_window_view`` and ``einsum``); the other backends are tested against it. Equations: the interaction's module.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .interaction import implements


def flat(s):
    return s.reshape(s.shape[0], -1)


@implements("dense", "numpy")
class DenseNumpy:
    @staticmethod
    def post_field(i, params, s_pre):
        return flat(s_pre) @ params["weight"].T

    @staticmethod
    def pre_field(i, params, s_pre, s_post):
        return (flat(s_post) @ params["weight"]).reshape(s_pre.shape)

    @staticmethod
    def parameter_gradient(i, params, s_pre, s_post):
        return {"weight": flat(s_post).T @ flat(s_pre) / s_pre.shape[0]}


@implements("bias", "numpy")
class BiasNumpy:
    @staticmethod
    def field(i, params, s):
        """b broadcast to s's shape (B, n) or (B, C, H, W)."""
        return np.broadcast_to(params["bias"].reshape((1, -1) + (1,) * (s.ndim - 2)), s.shape)

    @staticmethod
    def parameter_gradient(i, params, s_pre, s_post):
        summed = s_post.reshape(s_post.shape[0], s_post.shape[1], -1).sum(axis=2)
        return {"bias": summed.mean(axis=0)}


# ---------------------------------------------------------------- convolution and 2x2 pooling
def patches(i, s_pre):
    """im2col: (B, C_in, Ho, Wo, k, k) windows of the zero-padded input, taken every ``stride`` pixels."""
    p = i.padding
    padded = np.pad(s_pre, ((0, 0), (0, 0), (p, p), (p, p))) if p else s_pre
    windows = sliding_window_view(padded, (i.kernel, i.kernel), axis=(2, 3))
    return windows[:, :, ::i.stride, ::i.stride]


def conv(i, weight, s_pre):
    """conv(s_pre, W): (B, C_out, Ho, Wo)."""
    return np.einsum("bchwij,ocij->bohw", patches(i, s_pre), weight, optimize=True)


def conv_transpose(i, weight, grad, pre_shape):
    """The adjoint of ``conv``: (B, C_out, Ho, Wo) -> (B, *pre_shape), by col2im (scatter-add of the windows)."""
    p, k, s = i.padding, i.kernel, i.stride
    batch, _, height, width = grad.shape
    columns = np.einsum("bohw,ocij->bchwij", grad, weight, optimize=True)
    padded = np.zeros((batch, pre_shape[0], pre_shape[1] + 2 * p, pre_shape[2] + 2 * p), dtype=grad.dtype)
    for a in range(k):
        for c in range(k):
            padded[:, :, a:a + s * height:s, c:c + s * width:s] += columns[..., a, c]
    return padded[:, :, p:p + pre_shape[1], p:p + pre_shape[2]]


def windows_2x2(u):
    """(B, C, Ho, Wo) -> (B, C, Ho // 2, Wo // 2, 4), each window in row-major order (an odd trailing row or column
    is dropped)."""
    batch, channels, height, width = u.shape
    h, w = height // 2, width // 2
    cropped = u[:, :, :2 * h, :2 * w].reshape(batch, channels, h, 2, w, 2)
    return cropped.transpose(0, 1, 2, 4, 3, 5).reshape(batch, channels, h, w, 4)


def from_windows_2x2(windows, conv_shape):
    """The inverse of ``windows_2x2``: (B, C, h, w, 4) -> (B, C, Ho, Wo) with zeros on a dropped row/column."""
    batch, channels, h, w, _ = windows.shape
    out = np.zeros((batch, channels) + tuple(conv_shape), dtype=windows.dtype)
    out[:, :, :2 * h, :2 * w] = windows.reshape(batch, channels, h, w, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(
        batch, channels, 2 * h, 2 * w)
    return out


def pool(i, u):
    if i.pool is None:
        return u
    windows = windows_2x2(u)
    return windows.max(axis=4) if i.pool == "max" else windows.mean(axis=4)


def unpool(i, s_post, s_pre, weight, u=None):
    """Route s_post (B, C, h, w) back to the conv map's shape (Ho, Wo): to each window's first maximum of the current
    u = conv(s_pre) (max; pass u when it is at hand), spread as value / 4 (avg), or unchanged (no pooling)."""
    if i.pool is None:
        return s_post
    conv_shape = i.conv_shape(s_pre.shape[1:])
    if i.pool == "avg":
        spread = np.repeat(s_post[..., None] / 4, 4, axis=4)
    else:
        spread = np.zeros(s_post.shape + (4,), dtype=s_post.dtype)
        u = conv(i, weight, s_pre) if u is None else u
        np.put_along_axis(spread, windows_2x2(u).argmax(axis=4)[..., None], s_post[..., None], axis=4)
    return from_windows_2x2(spread, conv_shape)


@implements("conv2d", "numpy")
class Conv2dNumpy:
    @staticmethod
    def post_field(i, params, s_pre):
        return pool(i, conv(i, params["weight"], s_pre))

    @staticmethod
    def forward(i, params, s_pre):
        """(post field, routing) from one convolution of s_pre: the routing is u = conv(s_pre) itself for max pooling
        (its window maxima route the pre field), None otherwise."""
        u = conv(i, params["weight"], s_pre)
        return pool(i, u), (u if i.pool == "max" else None)

    @staticmethod
    def pre_field(i, params, s_pre, s_post, routing=None):
        routed = unpool(i, s_post, s_pre, params["weight"], routing)
        return conv_transpose(i, params["weight"], routed, s_pre.shape[1:])

    @staticmethod
    def parameter_gradient(i, params, s_pre, s_post):
        routed = unpool(i, s_post, s_pre, params["weight"])
        return {"weight": np.einsum("bohw,bchwij->ocij", routed, patches(i, s_pre), optimize=True) / s_pre.shape[0]}


# ---------------------------------------------------------------- costs
def softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@implements("squared_error", "numpy")
class SquaredErrorNumpy:
    @staticmethod
    def output(c, params, s_last):
        return flat(s_last)

    @staticmethod
    def value(c, params, s_last, y):
        return 0.5 * np.sum((flat(s_last).astype(np.float64) - y) ** 2, axis=1)

    @staticmethod
    def state_gradient(c, params, s_last, y):
        return (flat(s_last) - y).reshape(s_last.shape)

    @staticmethod
    def parameter_gradient(c, params, s_last, y):
        return {}


@implements("softmax_readout", "numpy")
class SoftmaxReadoutNumpy:
    @staticmethod
    def output(c, params, s_last):
        return flat(s_last) @ params["weight"].T + params["bias"]

    @staticmethod
    def value(c, params, s_last, y):
        logits = SoftmaxReadoutNumpy.output(c, params, s_last).astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        return -np.sum(y * (shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))), axis=1)

    @staticmethod
    def state_gradient(c, params, s_last, y):
        error = softmax(SoftmaxReadoutNumpy.output(c, params, s_last)) - y
        return (error @ params["weight"]).reshape(s_last.shape)

    @staticmethod
    def parameter_gradient(c, params, s_last, y):
        error = softmax(SoftmaxReadoutNumpy.output(c, params, s_last)) - y
        return {"weight": error.T @ flat(s_last) / s_last.shape[0], "bias": error.mean(axis=0)}


class NumpyArrays:
    """The few array operations the backend-generic relaxation needs (see :mod:`ebm_sim.model.dynamics`)."""

    #: once some samples have stopped, the relaxation steps only the others (gathered, then written back)
    retires = True

    @staticmethod
    def clip(a, low, high):
        return np.clip(a, low, high)

    @staticmethod
    def where(mask, a, b):
        """Per-sample select: mask (B,) broadcast over the sample's dimensions."""
        return np.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)

    @staticmethod
    def max_abs(a):
        """max |a| per sample: (B,)."""
        return np.abs(a).reshape(a.shape[0], -1).max(axis=1)

    @staticmethod
    def maximum(a, b):
        return np.maximum(a, b)

    @staticmethod
    def full(batch, value, like):
        return np.full(batch, value, dtype=np.float64)

    @staticmethod
    def zeros_int(batch, like):
        return np.zeros(batch, dtype=np.int64)

    @staticmethod
    def isfinite(a):
        return np.isfinite(a)

    @staticmethod
    def any(mask) -> bool:
        return bool(mask.any())

    @staticmethod
    def all(mask) -> bool:
        return bool(mask.all())

    @staticmethod
    def nonzero(mask):
        """The indices where mask (B,) is true."""
        return np.flatnonzero(mask)

    @staticmethod
    def ones_bool(batch, like):
        return np.ones(batch, dtype=bool)

    @staticmethod
    def copy(a):
        return a.copy()

    @staticmethod
    def zeros(shape, like):
        """Zeros of ``shape`` in ``like``'s dtype."""
        return np.zeros(shape, dtype=like.dtype)

    @staticmethod
    def stack(frames):
        """Frames (T arrays of one shape) as one array (T, ...)."""
        return np.stack(frames)


ARRAYS = NumpyArrays
