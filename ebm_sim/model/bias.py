"""Bias: a unary interaction on one layer, one value per unit of a flat layer or per channel of a (C, H, W) layer.

    Phi_i = <b, s>  (b broadcast over H and W)      field on the layer: b       dPhi_i/db = mean_b sum_{h,w} s
Its initialization bound is that of the interaction feeding the layer (torch's Linear/Conv2d bias), passed as fan_in.
"""
from __future__ import annotations

from dataclasses import dataclass

from .interaction import Interaction, register_interaction


@register_interaction
@dataclass
class Bias(Interaction):
    kind = "bias"
    param_names = ("bias",)
    unary = True
    fan_in_units: int = 1

    def __init__(self, layer: int, params: dict | None = None, fan_in_units: int = 1):
        super().__init__(pre=layer, post=layer, params=dict(params or {}))
        self.fan_in_units = int(fan_in_units)

    @property
    def layer(self) -> int:
        return self.post

    def param_shapes(self, pre_shape, post_shape) -> dict:
        return {"bias": (int(post_shape[0]),)}

    def fan_in(self, pre_shape) -> int:
        return self.fan_in_units

    def synapses(self, pre_shape, post_shape) -> int:
        return 0
