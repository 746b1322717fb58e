"""Conv2d interaction, with optional 2x2 pooling inside the term (Laborieux et al. 2021 ``P_CNN``; Scellier et al.
2023 ``ConvMaxPoolHopfield`` / ``ConvAvgPoolHopfield``):

    Phi_i = <pool(conv(s_pre, W)), s_post>     s_pre: (C_in, H, W), W: (C_out, C_in, k, k), s_post: (C_out, H', W')
    conv: stride S, zero padding P, output (C_out, Ho, Wo), Ho = (H + 2P - k) // S + 1 (likewise Wo);
    pool: none, "max" or "avg" over 2x2 windows with stride 2, H' = Ho // 2 (a trailing odd row/column is dropped, as
          torch's max_pool2d does)
    field on post: pool(conv(s_pre))
    field on pre:  conv_transpose(unpool(s_post)), where max-unpooling routes each value to the position of its window's
                   maximum in the *current* conv(s_pre) (the first one in row-major order on ties, as torch does) and
                   average-unpooling spreads it as value / 4 over the window
    dPhi_i/dW = mean_b correlate(s_pre_b, unpool(s_post_b))  (C_out, C_in, k, k)
Max pooling makes Phi_i piecewise linear in s_pre: the routed pre field is its gradient wherever the maxima are unique.
"""
from __future__ import annotations

from dataclasses import dataclass

from .interaction import Interaction, register_interaction

POOLS = (None, "max", "avg")


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """(size + 2 padding - kernel) // stride + 1 (may be < 1: the caller refuses it)."""
    return (size + 2 * padding - kernel) // stride + 1


@register_interaction
@dataclass
class Conv2d(Interaction):
    kind = "conv2d"
    param_names = ("weight",)
    kernel: int = 3
    stride: int = 1
    padding: int = 0
    pool: str | None = None

    def __post_init__(self):
        for name in ("kernel", "stride"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"conv {name} must be >= 1, got {getattr(self, name)}")
        if int(self.padding) < 0:
            raise ValueError(f"conv padding must be >= 0, got {self.padding}")
        if self.pool not in POOLS:
            raise ValueError(f"conv pool must be one of None, 'max', 'avg', got {self.pool!r}")
        self.kernel, self.stride, self.padding = int(self.kernel), int(self.stride), int(self.padding)

    def hyperparameters(self) -> dict:
        return {"kernel": self.kernel, "stride": self.stride, "padding": self.padding, "pool": self.pool}

    def conv_shape(self, pre_shape) -> tuple:
        """(C_out-less) spatial size of conv(s_pre) before pooling: (Ho, Wo)."""
        _, height, width = pre_shape
        return (conv_output_size(height, self.kernel, self.stride, self.padding),
                conv_output_size(width, self.kernel, self.stride, self.padding))

    def output_shape(self, pre_shape, channels: int) -> tuple:
        """The post layer's shape (C_out, H', W') for a pre layer of ``pre_shape``; ValueError if it is empty."""
        if len(pre_shape) != 3:
            raise ValueError(f"a conv layer needs a (C, H, W) layer before it, got shape {tuple(pre_shape)}")
        height, width = self.conv_shape(pre_shape)
        if height < 1 or width < 1:
            raise ValueError(f"a {self.kernel}x{self.kernel} kernel with padding {self.padding} does not fit a "
                             f"{pre_shape[1]}x{pre_shape[2]} input")
        if self.pool is not None:
            height, width = height // 2, width // 2
            if height < 1 or width < 1:
                raise ValueError(f"2x2 pooling of a {self.conv_shape(pre_shape)[0]}x{self.conv_shape(pre_shape)[1]} "
                                 "map leaves nothing")
        return (int(channels), height, width)

    def param_shapes(self, pre_shape, post_shape) -> dict:
        return {"weight": (int(post_shape[0]), int(pre_shape[0]), self.kernel, self.kernel)}

    def fan_in(self, pre_shape) -> int:
        return int(pre_shape[0]) * self.kernel * self.kernel

    def synapses(self, pre_shape, post_shape) -> int:
        height, width = self.conv_shape(pre_shape)
        return int(post_shape[0]) * height * width * self.fan_in(pre_shape)

    def check(self, pre_shape, post_shape) -> None:
        expected = self.output_shape(pre_shape, post_shape[0] if len(post_shape) == 3 else 0)
        if tuple(post_shape) != expected:
            raise ValueError(f"{self.describe()} maps a {tuple(pre_shape)} layer to {expected}, "
                             f"but layer {self.post} has shape {tuple(post_shape)}")
        super().check(pre_shape, post_shape)
