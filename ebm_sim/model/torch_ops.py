"""The torch implementation of every interaction and cost (CPU and CUDA; autograd flows through all of them):
``conv2d``, ``conv_transpose2d``, ``max_pool2d``/``max_unpool2d`` (first maximum on ties, as the numpy reference),
``avg_pool2d``. Equations: the interaction's module; tests hold this file against :mod:`ebm_sim.model.numpy_ops`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .interaction import implements


def tensors(arrays: dict, device="cpu", dtype=None, requires_grad: bool = False) -> dict:
    """numpy parameter dict -> tensors on ``device`` (dtype: the arrays' own unless given)."""
    out = {}
    for name, a in arrays.items():
        t = torch.as_tensor(np.asarray(a), device=device)
        t = t.to(dtype) if dtype is not None else t
        out[name] = t.clone().requires_grad_(requires_grad)
    return out


def flat(s):
    return s.reshape(s.shape[0], -1)


@implements("dense", "torch")
class DenseTorch:
    @staticmethod
    def post_field(i, params, s_pre):
        return flat(s_pre) @ params["weight"].t()

    @staticmethod
    def pre_field(i, params, s_pre, s_post):
        return (flat(s_post) @ params["weight"]).reshape(s_pre.shape)

    @staticmethod
    def parameter_gradient(i, params, s_pre, s_post):
        return {"weight": flat(s_post).t() @ flat(s_pre) / s_pre.shape[0]}


@implements("bias", "torch")
class BiasTorch:
    @staticmethod
    def field(i, params, s):
        return params["bias"].reshape((1, -1) + (1,) * (s.dim() - 2)).expand(s.shape)

    @staticmethod
    def parameter_gradient(i, params, s_pre, s_post):
        return {"bias": s_post.reshape(s_post.shape[0], s_post.shape[1], -1).sum(2).mean(0)}


def conv(i, weight, s_pre):
    return F.conv2d(s_pre, weight, stride=i.stride, padding=i.padding)


def conv_transpose(i, weight, grad, pre_shape):
    """The adjoint of ``conv`` back to (B, *pre_shape): output_padding = (H + 2P - k) mod S restores the rows and
    columns a stride > 1 skipped (always in [0, S), so conv_transpose2d accepts it)."""
    extra = tuple((int(pre_shape[d]) + 2 * i.padding - i.kernel) % i.stride for d in (1, 2))
    return F.conv_transpose2d(grad, weight, stride=i.stride, padding=i.padding, output_padding=extra)


def unpool(i, s_post, s_pre, weight, indices=None):
    """s_post back to the conv map's shape: max-unpooled to the argmax ``indices`` of the current conv(s_pre)
    (computed when not given), spread as value / 4 (avg), or unchanged."""
    if i.pool is None:
        return s_post
    conv_shape = i.conv_shape(tuple(s_pre.shape[1:]))
    if i.pool == "avg":
        spread = s_post.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3) / 4
        return F.pad(spread, (0, conv_shape[1] - spread.shape[3], 0, conv_shape[0] - spread.shape[2]))
    if indices is None:
        with torch.no_grad():
            _, indices = F.max_pool2d(conv(i, weight, s_pre), 2, return_indices=True)
    return F.max_unpool2d(s_post, indices, 2, output_size=conv_shape)


@implements("conv2d", "torch")
class Conv2dTorch:
    @staticmethod
    def post_field(i, params, s_pre):
        u = conv(i, params["weight"], s_pre)
        if i.pool == "max":
            return F.max_pool2d(u, 2)
        return F.avg_pool2d(u, 2) if i.pool == "avg" else u

    @staticmethod
    def forward(i, params, s_pre):
        """(post field, routing) from one convolution of s_pre: the routing is its max-pool indices (None for other
        pooling), what ``pre_field`` needs of conv(s_pre)."""
        u = conv(i, params["weight"], s_pre)
        if i.pool == "max":
            return F.max_pool2d(u, 2, return_indices=True)
        return (F.avg_pool2d(u, 2) if i.pool == "avg" else u), None

    @staticmethod
    def pre_field(i, params, s_pre, s_post, routing=None):
        routed = unpool(i, s_post, s_pre, params["weight"], routing)
        return conv_transpose(i, params["weight"], routed, tuple(s_pre.shape[1:]))

    @staticmethod
    def parameter_gradient(i, params, s_pre, s_post):
        routed = unpool(i, s_post, s_pre, params["weight"])
        weight = torch.nn.grad.conv2d_weight(s_pre, params["weight"].shape, routed, stride=i.stride,
                                             padding=i.padding)
        return {"weight": weight / s_pre.shape[0]}


@implements("squared_error", "torch")
class SquaredErrorTorch:
    @staticmethod
    def output(c, params, s_last):
        return flat(s_last)

    @staticmethod
    def value(c, params, s_last, y):
        return 0.5 * ((flat(s_last) - y) ** 2).sum(1)

    @staticmethod
    def state_gradient(c, params, s_last, y):
        return (flat(s_last) - y).reshape(s_last.shape)

    @staticmethod
    def parameter_gradient(c, params, s_last, y):
        return {}


@implements("softmax_readout", "torch")
class SoftmaxReadoutTorch:
    @staticmethod
    def output(c, params, s_last):
        return torch.addmm(params["bias"], flat(s_last), params["weight"].t())

    @staticmethod
    def value(c, params, s_last, y):
        return -(y * torch.log_softmax(SoftmaxReadoutTorch.output(c, params, s_last), dim=1)).sum(1)

    @staticmethod
    def state_gradient(c, params, s_last, y):
        error = torch.softmax(SoftmaxReadoutTorch.output(c, params, s_last), dim=1) - y
        return (error @ params["weight"]).reshape(s_last.shape)

    @staticmethod
    def parameter_gradient(c, params, s_last, y):
        error = torch.softmax(SoftmaxReadoutTorch.output(c, params, s_last), dim=1) - y
        return {"weight": error.t() @ flat(s_last) / s_last.shape[0], "bias": error.mean(0)}


class TorchArrays:
    """The array vocabulary of :mod:`ebm_sim.model.dynamics` on tensors (bookkeeping detached from autograd)."""

    #: stopped samples stay in the batch, frozen by ``where`` (no gathers in the autograd graph, no host syncs)
    retires = False

    @staticmethod
    def clip(a, low, high):
        return a.clamp(low, high)

    @staticmethod
    def where(mask, a, b):
        return torch.where(mask.reshape((-1,) + (1,) * (a.dim() - 1)), a, b)

    @staticmethod
    def max_abs(a):
        return a.detach().abs().reshape(a.shape[0], -1).amax(1).double()

    @staticmethod
    def maximum(a, b):
        return torch.maximum(a, b)

    @staticmethod
    def full(batch, value, like):
        return torch.full((batch,), value, dtype=torch.float64, device=like.device)

    @staticmethod
    def zeros_int(batch, like):
        return torch.zeros(batch, dtype=torch.int64, device=like.device)

    @staticmethod
    def isfinite(a):
        return torch.isfinite(a)

    @staticmethod
    def any(mask) -> bool:
        return bool(mask.any())

    @staticmethod
    def all(mask) -> bool:
        return bool(mask.all())


    @staticmethod
    def ones_bool(batch, like):
        return torch.ones(batch, dtype=torch.bool, device=like.device)

    @staticmethod
    def copy(a):
        return a.clone()

    @staticmethod
    def zeros(shape, like):
        """Zeros of ``shape`` in ``like``'s dtype, on its device."""
        return like.new_zeros(shape)

    @staticmethod
    def stack(frames):
        """Frames (T tensors of one shape) as one tensor (T, ...)."""
        return torch.stack(frames)


ARRAYS = TorchArrays
